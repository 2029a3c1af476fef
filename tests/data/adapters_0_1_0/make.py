"""How the saved-adapter fixture beside this file was made (with moecli 0.1.0 at commit 3512b4f, before the
package layout moved into subpackages): ten fact-world edits, one batch, one adapter per method, and each
edited model's greedy answers and last-token logits on 20 prompts. `tests/test_saved_adapters.py` checks that
today's code loads every adapter and gives the same answers and logits. Run it again only to make a fixture
for a new release (it overwrites this one):

    python tests/data/adapters_0_1_0/make.py
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import moecli
from moecli.world import default_model_dir

HERE = Path(__file__).resolve().parent
METHODS = ["lemoe", "memoe", "scen", "grace", "lora"]


def prompts(records: list[dict]) -> list[str]:
    """Per edit: its prompt, a rephrasing, and the first and last locality prompts (5 edits, 20 prompts)."""
    out: list[str] = []
    for r in records[:5]:
        out += [r["prompt"], r["rephrases"][0], r["locality"][0]["prompt"], r["locality"][-1]["prompt"]]
    return out


@torch.no_grad()
def last_logits(adapter: Path, texts: list[str]) -> torch.Tensor:
    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    moecli.load_edited(model, adapter, tok)
    rows = [model(**tok(t, return_tensors="pt")).logits[0, -1] for t in texts]
    return torch.stack(rows).contiguous()


def main() -> None:
    moe = [str(Path(sys.executable).parent / "moecli"), "--threads", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        edits = Path(tmp) / "edits.jsonl"
        subprocess.run([*moe, "world", "export", "--n", "10", "--out", str(edits)], check=True, capture_output=True)
        shutil.copy(edits, HERE / "edits.jsonl")
        records = [json.loads(line) for line in edits.read_text().splitlines()]
        texts = prompts(records)
        (HERE / "prompts.json").write_text(json.dumps(texts, indent=1) + "\n")
        for method in METHODS:
            run = Path(tmp) / method
            subprocess.run([*moe, "batch-edit", "--method", method, "--data", str(edits), "--batch-size", "10",
                            "--out", str(run), "--quiet"], check=True, capture_output=True)
            shutil.rmtree(HERE / method, ignore_errors=True)
            shutil.copytree(run / "adapter", HERE / method)
            manifest = HERE / method / "manifest.json"  # no path of this machine in the repository
            manifest.write_text(manifest.read_text().replace(str(default_model_dir()), "fact_world")
                                .replace(str(edits), "edits.jsonl"))
            answers = subprocess.run([*moe, "ask", "--adapter", str(HERE / method), "--model",
                                      str(default_model_dir()), "--json", "--max-new-tokens", "6", *texts],
                                     check=True, capture_output=True, text=True).stdout
            (HERE / f"{method}.answers.json").write_text(json.dumps(json.loads(answers), indent=1) + "\n")
            save_file({"logits": last_logits(HERE / method, texts)}, str(HERE / f"{method}.logits.safetensors"))


if __name__ == "__main__":
    main()
