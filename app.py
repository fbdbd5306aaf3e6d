"""Circuit browser, prompt lab and ablation plots (Gradio): `python app.py`, locally and as a Hugging Face Space.

The app lives in `modeling_csp.app.ui`; this file only starts it, with the model list of the csp_space.json
beside it (a Space's build writes one).
"""

import sys
from pathlib import Path

from modeling_csp.app import missing_app_extra

if __name__ == "__main__":
    if missing := missing_app_extra("python app.py"):
        sys.exit(f"error: {missing}")
    from modeling_csp.app.ui import main

    main(Path(__file__).resolve().parent)
