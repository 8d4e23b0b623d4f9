#!/usr/bin/env bash
# One device call (see the device tool): the cuda-marked tests, then issue 9's single-GPU check: tp2 engines with
# both ranks on the one GPU give the tp1 engine's tokens (stories260K fp32; a LLaMA-2-7B-shaped bf16 dummy).
# Needs .whl/ (hydra-core, omegaconf, antlr4, rouge_score, hypothesis, ...) and .shared/ (a copy of ../shared's small
# files) carried. Results under $OUT.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=8 EF_SHARED_DIR=$PWD/.shared
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
if [ "${CUDA_TESTS:-1}" = 1 ]; then
  timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tail -n 15 | tee $OUT/cuda_tests.txt
  echo "cuda tests done at $(el)s"
fi
S=/tmp/st; P="1,403,407,261,378"; Q="1,15,200,7,9,11,13"
for tp in 1 2; do
  timeout 60 python3 -m engine_factory recipe=stories260k_fp32 parallel.tp=$tp validate.enabled=false store=$S \
    | tail -n 1 | sed 's/^engine: //' > $OUT/st_tp$tp.path
  timeout 60 python3 -m runtime.run --engine_dir "$(cat $OUT/st_tp$tp.path)" --device cuda --input_ids $P --input_ids $Q \
    --max_output_len 64 --json > $OUT/st_tp$tp.jsonl 2> $OUT/st_tp$tp.err; echo "stories tp$tp rc=$? at $(el)s"
done
cmp -s $OUT/st_tp1.jsonl $OUT/st_tp2.jsonl && echo "stories260K tp2 == tp1" || echo "stories260K tp2 DIFFERS from tp1"
L="limits.max_batch_size=2 limits.max_input_len=64 limits.max_output_len=64"
for tp in 1 2; do
  timeout 240 python3 -m engine_factory recipe=llama7b_fp16_dummy precision=bf16 parallel.tp=$tp $L validate.enabled=false \
    store=$S 2> $OUT/l7_tp$tp.build.err | tail -n 1 | sed 's/^engine: //' > $OUT/l7_tp$tp.path; echo "7B tp$tp built at $(el)s"
  timeout 180 python3 -m runtime.run --engine_dir "$(cat $OUT/l7_tp$tp.path)" --device cuda --input_ids $P --input_ids $Q \
    --max_output_len 32 --json > $OUT/l7_tp$tp.jsonl 2> $OUT/l7_tp$tp.err; echo "7B tp$tp rc=$? at $(el)s"
  tail -n 2 $OUT/l7_tp$tp.err
done
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
for name in ("st", "l7"):
    try:
        a = [json.loads(l)["output_ids"] for l in open(f"{out}/{name}_tp1.jsonl")]
        b = [json.loads(l)["output_ids"] for l in open(f"{out}/{name}_tp2.jsonl")]
    except Exception as e:
        print(name, "missing output", e); continue
    same = [x == y for x, y in zip(a, b)]
    first = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None) for x, y in zip(a, b)]
    print(json.dumps({"model": name, "prompts": len(a), "identical": same, "first_difference": first}))
PY
