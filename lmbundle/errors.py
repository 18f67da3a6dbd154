"""User-facing errors: the CLI prints `error: <message>` on one line and exits 2, never a traceback."""


class LmbundleError(Exception):
    """A problem with the user's input (file, checkpoint, bundle, prompt, request) that we can name."""

    exit_code = 2
