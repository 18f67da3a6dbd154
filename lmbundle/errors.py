"""User-facing errors: the CLI prints `error: <message>` on one line and exits 2, never a traceback; the
server answers them with a 4xx (serve/app.py maps each kind to its status and code)."""


class LmbundleError(Exception):
    """A problem with the user's input (file, checkpoint, bundle, prompt, request) that we can name."""

    exit_code = 2


class ContextTooLong(LmbundleError):
    """A prompt, with the tokens asked for, past the bundle's context."""


class TemplateError(LmbundleError):
    """The chat template refused the messages (its own `raise_exception`)."""
