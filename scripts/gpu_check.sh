#!/usr/bin/env bash
# On a CUDA machine, one command: the conformance suite on cuda, then `kiln run` for MiniLM and
# BERT-base at fp32 and fp16 on every backend available there, and GPT-2's generation (static KV
# cache) at fp32 and fp16, Inductor again with CUDA graphs (mode reduce-overhead). The reports and one Markdown file
# with every table go to docs/gpu/<date>-<gpu>/ (commit what you measured).
#
# Machines without a network (the lent GPU machines) get missing packages as wheels in .whl/;
# a wheel over the transfer limit may come in parts named NAME.whl.part-aa, -ab, ... (split -b),
# joined here. Without Kiln installed, it runs from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY' || { echo "gpu_check: no CUDA device here; run it on a GPU machine" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY

if compgen -G ".whl/*.part-*" > /dev/null; then
    for first in .whl/*.part-aa; do cat "${first%.part-aa}".part-* > "${first%.part-aa}"; done
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/kiln-site .whl/*.whl
    export PYTHONPATH="/tmp/kiln-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
out="docs/gpu/$(date +%F)-$gpu"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

status=0
KILN_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_conformance.py 2>&1 | tee "$out/conformance.txt" || status=1

python -m pipeline backends --device cuda | tee "$out/backends.txt"
for model in minilm-l6 bert-base; do
    python -m pipeline run --model "$model" --precisions fp32,fp16 --shapes 1x128,8x128 --device cuda \
        --out "$out/$model" --quiet > /dev/null || status=1
done
python -m pipeline run --model gpt2 --mode generate --backends eager,inductor,onnxruntime,tensorrt --precisions fp32,fp16 \
    --shapes 1x128,8x128 --device cuda --out "$out/gpt2-generate" --quiet > /dev/null || status=1
python -m pipeline run --model gpt2 --mode generate --backends eager,inductor --option inductor.mode=reduce-overhead \
    --shapes 1x128,8x128 --device cuda --out "$out/gpt2-generate-cudagraphs" --quiet > /dev/null || status=1

python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = [f"# Kiln on {out.name}\n", "Made by `scripts/gpu_check.sh`; speedups are against eager fp32 in the same run.\n"]
for model in ("minilm-l6", "bert-base", "gpt2-generate", "gpt2-generate-cudagraphs"):
    md = out / model / "report.md"
    parts.append(md.read_text() if md.is_file() else f"## {model}\n\nno report (the run failed; see above)\n")
(out / "README.md").write_text("\n".join(parts))
print(f"wrote {out / 'README.md'}")
PY
exit $status
