"""Write a pruned model as a loadable Hugging Face checkpoint (safetensors + tokenizer + config) with a
sparsity report beside it, atomically: a half-written folder is never left under the final name."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

REPORT_NAME = "dlp_report.json"


def save_checkpoint(model, tokenizer, out: str | Path, report: dict) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
