"""`lmbundle info --check`: does a bundle run on each host that loads Core AI bundles?

The hosts and their rules live in `bundle/hosts/` (one module each; every rule names the file and lines
of Apple's source at 86b363d, the pull request it comes from, or the zoo's documents). A rule ends as
- PASS: the host accepts this part of the bundle;
- FAIL: the host rejects it or runs it wrongly;
- WARN: it runs, under a condition the detail names (a run setting, a device limit).
The asset's function signatures are read with coreai-core's `AIModelAsset.summary` (no compile), the call
Apple's loader uses to probe an asset's structure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LmbundleError
from .format import BUNDLE_VERSION
from .hosts import HOSTS, check_host
from .hosts.base import FAIL, PASS, WARN, Signature, Subject, Tensor

IOS_KV_LIMIT = 2048  # apple/coreai-models#124: a growing KV bound at >= 2048 gave corrupt output on iOS
IOS_ENTITLEMENT_BYTES = 2 * (1 << 30)  # cold specialization past ~2 GB needs the increased-memory-limit entitlement


@dataclass
class Rule:
    host: str
    name: str
    status: str
    detail: str
    source: str


@dataclass
class CheckReport:
    bundle: Path
    hosts: list[str]
    target: str = "macos"
    rules: list[Rule] = field(default_factory=list)

    def failures(self, host: str | None = None) -> list[Rule]:
        return [r for r in self.rules if r.status == FAIL and host in (None, r.host)]

    @property
    def passed(self) -> bool:
        return not self.failures()

    def adder(self, host: str):
        return lambda name, status, detail, source: self.rules.append(Rule(host, name, status, detail, source))

    def lines(self) -> list[str]:
        """One row per rule with a column per host, then each distinct detail with its hosts and source."""
        width = max([len(r.name) for r in self.rules] + [10])
        out = [f"{self.bundle}: Core AI hosts check (target {self.target})",
               "  " + " " * width + "  " + "".join(f"{h:<15}" for h in self.hosts)]
        names = list(dict.fromkeys(r.name for r in self.rules))
        for name in names:
            of = [r for r in self.rules if r.name == name]
            status = {r.host: r.status for r in of}
            out.append(f"  {name:<{width}}  " + "".join(f"{status.get(h, '-'):<15}" for h in self.hosts).rstrip())
            for detail, source in dict.fromkeys((r.detail, r.source) for r in of):
                hosts = [r.host for r in of if (r.detail, r.source) == (detail, source)]
                label = "all" if len(hosts) == len(self.hosts) and len(self.hosts) > 1 else ", ".join(hosts)
                out.append(f"      {label}: {detail}  [{source}]")
        for host in self.hosts:
            failed = self.failures(host)
            warned = [r.name for r in self.rules if r.host == host and r.status == WARN]
            verdict = f"FAIL ({', '.join(r.name for r in failed)})" if failed else \
                f"PASS with {len(warned)} warning(s) ({', '.join(warned)})" if warned else "PASS"
            out.append(f"  verdict {host}: {verdict}")
        return out

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle), "target": self.target, "passed": self.passed,
                "hosts": {h: not self.failures(h) for h in self.hosts},
                "rules": [rule.__dict__ for rule in self.rules]}


def _parse_type(text: str) -> Tensor | None:
    """'NDArray (Float32, 1 × 1 × 2 × ? × 32)' -> Tensor('Float32', [1, 1, 2, -1, 32])."""
    match = re.fullmatch(r"NDArray \((\w+), (.*)\)", text.strip())
    if not match:
        return None
    dims = [-1 if d.strip() == "?" else int(d) for d in match.group(2).split("×")] if match.group(2).strip() else []
    return Tensor(match.group(1), dims)


def read_signatures(aimodel: Path) -> dict[str, Signature]:
    """The functions of a `.aimodel` and their inputs/outputs/states, in declaration order."""
    try:
        from coreai.authoring.asset import AIModelAsset
    except ImportError as exc:
        raise LmbundleError("--check reads the asset with coreai-core: pip install 'lmbundle[coreai]'") from exc
    try:
        summary = AIModelAsset.load(aimodel).summary(include_statistics=False)
    except Exception as exc:  # the runtime raises plain RuntimeErrors on unreadable assets
        raise LmbundleError(f"{aimodel}: Core AI cannot read the asset ({str(exc).splitlines()[0][:200]})") from None
    if summary is None:
        raise LmbundleError(f"{aimodel}: the asset has no bytecode")
    parse = lambda pairs: [(name, _parse_type(text)) for name, text in pairs]  # noqa: E731
    return {name: Signature(parse(summary.function_inputs(name)), parse(summary.function_outputs(name)),
                            parse(summary.function_states(name)))
            for name in summary.function_names}


def _signatures_of(folder: Path, path) -> dict[str, Signature] | None:
    if isinstance(path, str) and (folder / path).is_dir():
        return read_signatures(folder / path)
    return None


def _device_rules(subject: Subject, add) -> None:
    """iPhone limits, the same on every host."""
    if subject.target != "ios":
        return
    context = subject.language.get("max_context_length")
    growing = subject.main is not None and any(t is not None and t.dynamic for _, t in subject.main.states)
    if growing and isinstance(context, int):
        add("iOS KV capacity", WARN if context >= IOS_KV_LIMIT else PASS, f"max_context_length {context}: a growing "
            f"KV bound at >= {IOS_KV_LIMIT} slots gave corrupt output on iPhone; cap prompt + output below it",
            "apple/coreai-models#124 (open)")
    size = sum(p.stat().st_size for p in subject.folder.rglob("*") if p.is_file() and p.suffix != ".safetensors")
    add("iOS memory", WARN if size >= IOS_ENTITLEMENT_BYTES else PASS, f"{size / 1e9:.2f} GB of Core AI assets: "
        "from ~2 GB, cold specialization needs the com.apple.developer.kernel.increased-memory-limit entitlement",
        "zoo run contract; coreai-cli doctor IPHONE_MEMORY_ENTITLEMENT")


def check_bundle(folder: str | Path, hosts: list[str] | tuple[str, ...] = HOSTS, target: str = "macos") -> CheckReport:
    """Apply each host's rules to the bundle at `folder`."""
    folder = Path(folder).expanduser()
    report = CheckReport(folder, list(hosts), target)
    meta_path = folder / "metadata.json"
    problem = None
    if folder.suffix in (".aimodel", ".aimodelc"):
        problem = "this is a model asset, not a bundle folder"
    elif not meta_path.is_file():
        problem = "no metadata.json in the folder"
    else:
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            problem = f"not valid JSON ({exc})"
        else:
            problem = None if isinstance(meta, dict) else "not a JSON object"
    if problem:
        for host in hosts:
            report.adder(host)("metadata.json", FAIL, problem, "apple@86b363d CoreAIShared/Bundle/ModelBundle.swift:153-160")
        return report
    subject = Subject(folder, meta, target)
    subject.functions = _signatures_of(folder, subject.assets.get("main"))
    subject.vision_functions = _signatures_of(folder, subject.assets.get("vision"))
    for host in hosts:
        add = report.adder(host)
        _lmbundle_version(subject, add)
        check_host(host, subject, add)
        _device_rules(subject, add)
    return report


def _lmbundle_version(subject: Subject, add) -> None:
    """A bundle an older lmbundle wrote has the old asset layout (GDN states first, a `prefill` with an
    output): no host contract to check it against."""
    version = subject.lmbundle.get("bundle_version") if subject.lmbundle else BUNDLE_VERSION
    add("lmbundle bundle_version", PASS if version == BUNDLE_VERSION else FAIL, f"{version!r}: bundles before "
        f"{BUNDLE_VERSION} declare the GDN states before the KV pair and a prefill function with an output; convert "
        "the checkpoint again", "lmbundle bundle/format.py BUNDLE_VERSION")


