#!/usr/bin/env bash
# One device call (see the device tool): the cuda-marked tests, then issue 9's single-GPU check: tp2 engines with
# both ranks on the one GPU against the tp1 engine (stories260K fp32 tokens; LLaMA-2-7B widths in bf16 with all
# 32 layers and in fp32 with 8 layers: tokens and teacher-forced logits, tests/perf/tp_logits_check.py).
# Needs .whl/ (hydra-core, omegaconf, antlr4, rouge_score, hypothesis, ...) and .shared/ (a copy of ../shared's small
# files) carried. Everything lands in $OUT/gpu_check.log (+ cuda_tests.txt): few files, as the tool returns at most 8.
# CUDA_TESTS=0 skips the tests; CUDA_TEST_ARGS picks some (default: all cuda-marked tests); STORIES=0 skips the
# stories260K pair; CASES="l7bf16" picks LLaMA cases (default: l7f32 l7bf16).
source tests/perf/device_env.sh  # the carried wheels, PYTHONPATH, EF_SHARED_DIR
export EF_SHARED_DIR=$PWD/.shared
LOG=$OUT/gpu_check.log; T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
say() { echo "$*" | tee -a $LOG; }
if [ "${CUDA_TESTS:-1}" = 1 ]; then
  timeout ${CUDA_TEST_TIMEOUT:-200} python3 -m pytest -v -rfE -m cuda -p no:cacheprovider ${CUDA_TEST_ARGS:-tests} \
    > $OUT/cuda_tests.txt 2>&1
  say "cuda tests rc=$? at $(el)s: $(grep -c PASSED $OUT/cuda_tests.txt) passed, $(grep -c FAILED $OUT/cuda_tests.txt) failed"
  grep -E "FAILED|ERROR" $OUT/cuda_tests.txt | tail -n 20 | tee -a $LOG
fi
S=/tmp/st; P="1,403,407,261,378"; Q="1,15,200,7,9,11,13"
build() {  # recipe overrides... -> prints the engine folder
  timeout ${BUILD_TIMEOUT:-240} python3 -m engine_factory validate.enabled=false store=$S "$@" 2>>$OUT/build.err | tail -n 1 | sed 's/^engine: //'
}
for tp in $([ "${STORIES:-1}" = 1 ] && echo 1 2); do
  e=$(build recipe=stories260k_fp32 parallel.tp=$tp)
  timeout 60 python3 -m runtime.run --engine_dir "$e" --device cuda --input_ids $P --input_ids $Q --max_output_len 64 \
    --json > /tmp/st_tp$tp.jsonl 2>>$OUT/build.err; say "stories tp$tp rc=$? at $(el)s"
done
[ "${STORIES:-1}" = 1 ] && { cmp -s /tmp/st_tp1.jsonl /tmp/st_tp2.jsonl && say "stories260K tp2 == tp1 (64 tokens, 2 prompts)" || say "stories260K tp2 DIFFERS"; }
L="limits.max_batch_size=2 limits.max_input_len=64 limits.max_output_len=64"
declare -A OVER=([l7f32]="precision=fp32 model.config.num_hidden_layers=8" [l7bf16]="precision=bf16")
for name in ${CASES:-l7f32 l7bf16}; do
  over=${OVER[$name]}
  # both builds at once (CPU and disk bound; the GPU is idle meanwhile), tp2 with a worker per rank
  build recipe=llama7b_fp16_dummy $over parallel.tp=1 $L > /tmp/e1 & build recipe=llama7b_fp16_dummy $over \
    parallel.tp=2 parallel.build_workers=2 $L > /tmp/e2 &
  # ORACLE=1: also the fp32 tp1 engine of the same dummy weights, which both are set against
  [ "${ORACLE:-0}" = 1 ] && build recipe=llama7b_fp16_dummy ${over/precision=bf16/precision=fp32} parallel.tp=1 $L > /tmp/e3
  wait; e1=$(cat /tmp/e1); e2=$(cat /tmp/e2); e3=$([ "${ORACLE:-0}" = 1 ] && cat /tmp/e3)
  say "$name tp1 and tp2 built at $(el)s: $e1 $e2 ${e3:+(oracle $e3)}"
  timeout 240 python3 tests/perf/tp_logits_check.py --ref "$e1" --other "$e2" ${e3:+--oracle "$e3"} --device cuda \
    2>>$OUT/build.err | tee -a $LOG
  say "$name checked at $(el)s"; rm -rf "$e1" "$e2" $e3
done
tail -n 5 $OUT/build.err >> $LOG
