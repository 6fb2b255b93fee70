"""Reload a run folder with plain transformers + PEFT — no peftlab import — and save logits.

Used by the reload-parity tests in a subprocess, so that a peftlab import cannot sneak in.
usage: python plain_reload.py RUN TEXTS.json OUT.npy
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

run, texts_file, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cfg = yaml.safe_load((run / "config.yaml").read_text())
id2label = json.loads((run / "labels.json").read_text())["id2label"]
if (run / "model").is_dir():
    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
else:
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(cfg["_run"]["backbone"], num_labels=len(id2label))
    model = PeftModel.from_pretrained(base, run / "adapter")
    tok = AutoTokenizer.from_pretrained(run / "adapter")
model.eval()
texts = json.loads(texts_file.read_text())
enc = tok(texts, padding=True, truncation=True, max_length=cfg["model"]["max_length_tokens"], return_tensors="pt")
with torch.no_grad():
    logits = model(**enc).logits
assert "peftlab" not in sys.modules
np.save(out, logits.numpy())
