#!/usr/bin/env bash
# One device call for the quantized linears (issue 11): the cuda-marked tests of the quant modes, then
# tests/perf/bench_linear.py: every mode at decode and prefill batches under auto (our Triton kernels where
# they are chosen) and library (torch._int_mm / _scaled_mm for W8A8 / FP8) in the same call, and the launch-shape
# sweep of the Triton kernels (W8A8, FP8, int4 at 16 / 64 rows with NATURAL tiles) within SWEEP_S seconds.
# Needs .whl/ (hydra-core, omegaconf, antlr4, rouge_score, hypothesis, ...) carried, as gpu_tp_check.sh; made here by
#   pip download -d .whl --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps \
#     hydra_core==1.3.2 omegaconf==2.3.0 absl_py nltk gguf==0.19.0 platformdirs hypothesis==6.170.15 sortedcontainers \
#     pytest-xdist==3.8.0 execnet==2.1.2  (gpu_call.sh TESTS_N=)
#   pip wheel -w .whl --no-deps antlr4-python3-runtime==4.9.3 rouge_score==0.1.2 gemlite==0.6.0.post2
#   (gemlite: only tests/perf/gemv_probe.py --sections gemlite imports it, a kernel under evaluation)
# Results: $OUT/quant_check.log, $OUT/cuda_tests.txt, $OUT/linear.jsonl. ~8 min on an H200 with the defaults.
source tests/perf/device_env.sh  # the carried wheels, PYTHONPATH, EF_SHARED_DIR
LOG=$OUT/quant_check.log; T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
say() { echo "$*" | tee -a $LOG; }
if [ "${CUDA_TESTS:-1}" = 1 ]; then
  timeout ${CUDA_TEST_TIMEOUT:-200} python3 -m pytest -v -rfE -m cuda -p no:cacheprovider \
    tests/test_quant.py tests/test_smoothquant.py tests/test_fp8.py > $OUT/cuda_tests.txt 2>&1
  say "cuda tests rc=$? at $(el)s: $(grep -c PASSED $OUT/cuda_tests.txt) passed, $(grep -c FAILED $OUT/cuda_tests.txt) failed"
  grep -E "FAILED|ERROR" $OUT/cuda_tests.txt | tail -n 20 | tee -a $LOG
fi
timeout ${TABLE_TIMEOUT:-150} python3 tests/perf/bench_linear.py --out $OUT \
  --modes ${MODES:-none,int8_wo,int4_wo_g128,sq_per_token_per_channel,fp8} --kernels auto,library \
  --batches ${BATCHES:-1,8,16,64,512} > /dev/null 2>>$LOG
say "bench_linear table rc=$? at $(el)s"
timeout $(( ${SWEEP_S:-180} + 60 )) python3 tests/perf/bench_linear.py --out $OUT --modes - --sweep \
  --sweep_s ${SWEEP_S:-180} --sweep_modes ${SWEEP_MODES:-sq_per_token_per_channel,fp8,int4_wo_g128} \
  --sweep_batches ${SWEEP_BATCHES:-1,16,64} > /dev/null 2>>$LOG
say "bench_linear sweep rc=$? at $(el)s"
# the four linears of a layer per (mode, variant, batch): µs summed, against bf16
python3 - "$OUT/linear.jsonl" <<'PY' | tee -a $LOG
import collections, json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
us = collections.defaultdict(float)
for r in rows:
    if r["kind"] == "linear":
        us[r["mode"], r["variant"], r["kernel"], r["M"]] += r["us"]
base = {M: t for (m, _, _, M), t in us.items() if m == "none"}
for (m, v, k, M), t in sorted(us.items()):
    print(f"{m:26s} {v:8s} {k:9s} M={M:<4d} {t:9.1f} us  x bf16 {base.get(M, float('nan')) / t:5.2f}")
for r in rows:
    if r["kind"] == "sweep":
        print("sweep", r["mode"], r["linear"], "M", r["M"], "default", r["default_us"], "best", r["best_us"], r["best"])
PY
