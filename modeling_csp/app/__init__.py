"""The Gradio app over the explorer: `ui.main` serves it (the repository's and a Space's `app.py` call it).

Needs the `[app]` extra (gradio, plotly); the model, conversion and the circuit library do not. This module itself
imports neither, so the CLI and `app.py` can say what to install before anything fails halfway.
"""

import importlib.util

APP_EXTRA = ("gradio", "plotly")  # the [app] extra's packages, which a plain `pip install csp-circuits` leaves out


def missing_app_extra(command: str) -> str | None:
    """The one-line error for a command that needs the [app] extra when it is not installed (else None), so such a
    command fails before any work with the install to run, not with an import traceback halfway through."""
    missing = []
    for name in APP_EXTRA:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if not missing:
        return None
    return f"{command} needs the app extra: pip install 'csp-circuits[app]' (not installed: {', '.join(missing)})"
