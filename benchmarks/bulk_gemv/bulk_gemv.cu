// int8 block-32 GEMV whose weights reach shared memory through Hopper's bulk copy engine (a probe: does a
// GEMV fed by `cp.async.bulk` stages stream the 2B's 4-25 MB decode weights faster than the Triton GEMV's
// register tiles? `benchmarks/bulk_gemv_probe.py` builds and times it).
//
// y[N] = W[N, K] x[K], W int8 with one fp16 scale per 32 inputs. A block of ROWS consecutive rows is one
// contiguous run of ROWS * K bytes (and ROWS * K / 32 scales), so one bulk copy a block fetches it, with no
// address math in the threads. Each CTA walks the row blocks blockIdx.x, + gridDim.x, ... and keeps STAGES
// of them in flight (a ring of shared-memory slots, an mbarrier each). x stays in registers for the whole
// walk: warp w owns inputs [w K / WARPS, (w + 1) K / WARPS) of every row, lane l 8 of them per 256.
// Per block each lane reduces its part of every row; warps meet through shared memory once a block.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace bulk_gemv {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void barrier_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(count));
}

__device__ __forceinline__ void barrier_expect(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void barrier_wait(uint64_t* bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n"
        "}\n" ::"r"(smem_address(bar)),
        "r"(parity)
        : "memory");
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_address(dst)), "l"(src), "r"(bytes), "r"(smem_address(bar))
                 : "memory");
}

template <int K, int ROWS, int STAGES, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) gemv_kernel(const int8_t* __restrict__ weight,
                                                          const __half* __restrict__ scales,
                                                          const __nv_bfloat16* __restrict__ x,
                                                          __nv_bfloat16* __restrict__ y, int blocks) {
    constexpr int GROUPS = K / 32;
    constexpr int CHUNKS = K / (WARPS * 256);  // 8-input chunks a lane owns in each row
    constexpr uint32_t WEIGHT_BYTES = ROWS * K;
    constexpr uint32_t SCALE_BYTES = ROWS * GROUPS * 2;
    static_assert(K % (WARPS * 256) == 0, "K must be a multiple of 256 a warp");
    static_assert(SCALE_BYTES % 16 == 0, "bulk copies move multiples of 16 bytes");

    extern __shared__ __align__(128) unsigned char shared[];
    int8_t* weight_slots = reinterpret_cast<int8_t*>(shared);
    __half* scale_slots = reinterpret_cast<__half*>(shared + STAGES * WEIGHT_BYTES);
    float* partial = reinterpret_cast<float*>(shared + STAGES * (WEIGHT_BYTES + SCALE_BYTES));
    uint64_t* full = reinterpret_cast<uint64_t*>(partial + ROWS * WARPS);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float xs[CHUNKS][8];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        const int k = warp * (K / WARPS) + c * 256 + lane * 8;
        const uint4 packed = *reinterpret_cast<const uint4*>(x + k);
        const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 f = __bfloat1622float2(pairs[j]);
            xs[c][2 * j] = f.x;
            xs[c][2 * j + 1] = f.y;
        }
    }

    const int mine = blocks > static_cast<int>(blockIdx.x) ? (blocks - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) barrier_init(&full[s], 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    auto issue = [&](int i) {  // block i of this CTA's walk into slot i % STAGES (thread 0)
        const int s = i % STAGES;
        const size_t block = blockIdx.x + static_cast<size_t>(i) * gridDim.x;
        barrier_expect(&full[s], WEIGHT_BYTES + SCALE_BYTES);
        bulk_copy(weight_slots + s * WEIGHT_BYTES, weight + block * WEIGHT_BYTES, WEIGHT_BYTES, &full[s]);
        bulk_copy(scale_slots + s * ROWS * GROUPS, scales + block * ROWS * GROUPS, SCALE_BYTES, &full[s]);
    };
    if (threadIdx.x == 0) {
        for (int i = 0; i < STAGES && i < mine; ++i) issue(i);
    }

    for (int i = 0; i < mine; ++i) {
        const int s = i % STAGES;
        barrier_wait(&full[s], (i / STAGES) & 1);
        const int8_t* w = weight_slots + s * WEIGHT_BYTES;
        const __half* sc = scale_slots + s * ROWS * GROUPS;
        float acc[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            acc[r] = 0.f;
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c) {
                const int k = warp * (K / WARPS) + c * 256 + lane * 8;
                const int2 packed = *reinterpret_cast<const int2*>(w + r * K + k);
                float dot = 0.f;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    dot += xs[c][j] * static_cast<float>(static_cast<int8_t>(packed.x >> (8 * j)));
                    dot += xs[c][4 + j] * static_cast<float>(static_cast<int8_t>(packed.y >> (8 * j)));
                }
                acc[r] += dot * __half2float(sc[r * GROUPS + k / 32]);
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
        }
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) partial[r * WARPS + warp] = acc[r];
        }
        __syncthreads();  // slot s read by every warp, the partial sums written
        if (threadIdx.x < ROWS) {
            float sum = 0.f;
#pragma unroll
            for (int v = 0; v < WARPS; ++v) sum += partial[threadIdx.x * WARPS + v];
            const size_t block = blockIdx.x + static_cast<size_t>(i) * gridDim.x;
            y[block * ROWS + threadIdx.x] = __float2bfloat16(sum);
        }
        if (threadIdx.x == 0 && i + STAGES < mine) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // our reads before the copy's writes
            issue(i + STAGES);
        }
        __syncthreads();  // the partial sums read before the next block writes them
    }
}

template <int K, int ROWS, int STAGES, int WARPS>
constexpr size_t shared_bytes() {
    return STAGES * (ROWS * K + ROWS * (K / 32) * 2) + ROWS * WARPS * 4 + STAGES * 8;
}

template <int K, int ROWS, int STAGES, int WARPS>
cudaError_t launch(const int8_t* weight, const __half* scales, const __nv_bfloat16* x, __nv_bfloat16* y,
                   int out_features, int ctas, cudaStream_t stream) {
    auto kernel = gemv_kernel<K, ROWS, STAGES, WARPS>;
    constexpr size_t bytes = shared_bytes<K, ROWS, STAGES, WARPS>();
    static bool configured = false;  // once, on the first (uncaptured) call: not an API to call inside a capture
    if (!configured) {
        cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
        if (status != cudaSuccess) return status;
        configured = true;
    }
    const int blocks = out_features / ROWS;
    kernel<<<ctas < blocks ? ctas : blocks, WARPS * 32, bytes, stream>>>(weight, scales, x, y, blocks);
    return cudaGetLastError();
}

}  // namespace bulk_gemv

// The probe's entry: y = W x for K in {2048, 6144}, ROWS in {4, 8, 16}, STAGES in {2, 3, 4} (8 warps).
// out_features must be a multiple of ROWS. Returns a cudaError_t (0: launched), or -1 for a shape or config
// not built here.
extern "C" int bulk_gemv_launch(const void* weight, const void* scales, const void* x, void* y, int out_features,
                                int in_features, int rows, int stages, int ctas, cudaStream_t stream) {
    using namespace bulk_gemv;
    const auto* w = static_cast<const int8_t*>(weight);
    const auto* s = static_cast<const __half*>(scales);
    const auto* xin = static_cast<const __nv_bfloat16*>(x);
    auto* out = static_cast<__nv_bfloat16*>(y);
    if (out_features % rows) return -1;
#define BULK_GEMV_CASE(K_, R_, S_)                                                             \
    if (in_features == K_ && rows == R_ && stages == S_)                                         \
        return static_cast<int>(launch<K_, R_, S_, 8>(w, s, xin, out, out_features, ctas, stream));
#define BULK_GEMV_STAGES(K_, R_) BULK_GEMV_CASE(K_, R_, 2) BULK_GEMV_CASE(K_, R_, 3) BULK_GEMV_CASE(K_, R_, 4)
    BULK_GEMV_STAGES(2048, 4)
    BULK_GEMV_STAGES(2048, 8)
    BULK_GEMV_STAGES(2048, 16)
    BULK_GEMV_STAGES(6144, 4)
    BULK_GEMV_STAGES(6144, 8)
    BULK_GEMV_CASE(6144, 16, 2)
#undef BULK_GEMV_STAGES
#undef BULK_GEMV_CASE
    return -1;
}
