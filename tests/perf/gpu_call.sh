#!/usr/bin/env bash
# One device call (the device tool's `run`): optional cuda tests, Triton launch-shape sweep and kernel probe,
# then `bench_table.py gpu` with the cases named; everything under $OUT. Carry .whl (see gpu_quant_check.sh's header),
# .peers (a copy of ../shared/peers) and .shared (stories260K, tokenizers/gpt2, data/ of ../shared).
#   TESTS=1 [TESTS_K=expr]  pytest -m cuda over tests/ (-k "$TESTS_K" when given), within TEST_S seconds;
#                          TESTS_N=4: that many pytest-xdist workers sharing the GPU (carry its wheels), tests dealt
#                          one by one (TESTS_DIST=load; 2026-12-07 "loadfile" left test_cuda.py's compiled tests to one
#                          worker, and the 150 s cut them), TESTS_DIST=loadfile: a file each
#   SWEEP="modes:batches ..."  bench_linear.py --sweep per entry, SWEEP_S seconds shared by the entries
#   PROBE=gemlite,tinygemm,kmajor,gluon gemv_probe.py --sections (a LLaMA-7B layer's linears by kernel) within PROBE_S
#                          (300) seconds, its gemv2 sweep within 60 less; GemLite autotunes every shape but 4096 x 4096
#                          on a fresh machine (its shipped H100 configs): rows are written as they come
#   CASES=...              bench_table.py gpu --cases (empty: no table), BUDGET_S its budget
#   PREBUILD=1             the cases' engines built in the background from the start (beside the tests and sweeps:
#                          7B quant builds take minutes of CPU), so that the table finds them in the store
#   TABLE=0                with PREBUILD=1: no table, only the cases' engines (waited for), for AB
#   AB="variant;variant"   after the table: runtime.bench on its tight engine, batch 1 and 64, 128 + 256, as is and
#                          with each variant: environment settings, then flags (e.g. "--inductor combo_kernels=true;
#                          EF_ROPE_IN_ATTENTION=0", "EF_WO_PRMT=0" with AB_CASES=int8_tight), rows in ab.jsonl (each with its
#                          variant as "ab" and its case);
#                          AB_CASES="tight,int8_tight": the engines of those cases instead, AB_BATCHES="1": those
#                          only. With PDL on by default (runtime.engine.decode_defaults), the first row of each case
#                          has it on: its A/B is the variant "--inductor triton.enable_pdl=false". AB=-: the cases'
#                          engines as they are only
#   CALL_S (default 585)   the whole call's seconds, from the script's start: an AB variant starts only with at least
#                          AB_NEED_S (default 120) of them left and is stopped 15 s before their end, so that the
#                          packing below runs before the device tool's limit (600 s) cuts the call (the tests, sweeps
#                          and table keep their own limits: TEST_S, SWEEP_S, BUDGET_S)
# What comes back (the device tool returns 8 files at most, and drops the rest): cuda_tests.txt, linear.jsonl,
# gemv_probe.jsonl, table/gpu.jsonl + benchmarks.md, ab.jsonl and logs.tgz (the logs but the builds'; the
# prebuild's own rows).
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 ))s; }
: "${OUT:?gpu_call.sh writes under \$OUT (the device tool sets it)}"
OUT=$(realpath "$OUT")
source tests/perf/device_env.sh  # the carried wheels, PYTHONPATH, EF_SHARED_DIR
left() { echo $(( ${CALL_S:-585} - ($(date +%s) - T0) )); }
W=$(mktemp -d)  # logs and scratch, packed into $OUT/logs.tgz at the end
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
if [ -n "$PREBUILD" ] && [ -n "$CASES" ]; then
  python3 tests/perf/bench_table.py gpu --out $W/prebuild --cases $CASES --build_only --budget_s 1200 \
    > /dev/null 2> $W/prebuild.log &
fi
if [ -n "$TESTS" ]; then
  # -v: a line a test as it ends, so a run cut by the timeout still names what passed (-q under xdist names none);
  # SIGINT at TEST_S: pytest stops and still prints the failures so far (2026-12-07: a cut run's one failure came
  # back without its message), SIGKILL 20 s later
  timeout -s INT -k 20 ${TEST_S:-120} python3 -m pytest -v -rfE -m cuda -p no:cacheprovider -p no:benchmark tests \
    ${TESTS_K:+-k "$TESTS_K"} ${TESTS_N:+-n $TESTS_N --dist ${TESTS_DIST:-load}} > $OUT/cuda_tests.txt 2>&1
  echo "cuda tests rc=$? at $(el): $(tail -n 1 $OUT/cuda_tests.txt)"
  grep -cE " PASSED" $OUT/cuda_tests.txt; grep -E "(FAILED|ERROR)" $OUT/cuda_tests.txt | head -n 10
fi
if [ -n "$SWEEP" ]; then  # each space-separated entry gets an equal share of SWEEP_S
  n=$(echo $SWEEP | wc -w)
  for entry in $SWEEP; do
    timeout $(( ${SWEEP_S:-150} / n + 60 )) python3 tests/perf/bench_linear.py --out $OUT --modes - --sweep \
      --sweep_s $(( ${SWEEP_S:-150} / n )) --sweep_modes ${entry%%:*} --sweep_batches ${entry##*:} > /dev/null 2>> $W/sweep.log
    echo "sweep $entry rc=$? at $(el)"
  done
  tail -n 3 $W/sweep.log; python3 tests/perf/sweep_summary.py $OUT/linear.jsonl --top 8
fi
if [ -n "$PROBE" ]; then  # tests/perf/gemv_probe.py's sections (e.g. gemlite,tinygemm,triton) within PROBE_S
  timeout -s INT -k 10 ${PROBE_S:-300} python3 tests/perf/gemv_probe.py --out $OUT --sections $PROBE \
    --budget_s $(( ${PROBE_S:-300} - 60 )) > /dev/null 2> $W/probe.log
  echo "probe $PROBE rc=$? at $(el)"; tail -n 3 $W/probe.log
  [ -f $OUT/gemv_probe.jsonl ] && python3 -c "import json, sys; [print(r['kernel'], r.get('linear'), r.get('M'),
    r.get('us'), r.get('GB_s'), r.get('rel_err'), r.get('cfg', '')) if r['kind'] == 'probe' else print(r)
    for r in map(json.loads, open(sys.argv[1]))]" $OUT/gemv_probe.jsonl
fi
if [ -n "$CASES" ] && [ "${TABLE:-1}" == 0 ]; then  # the engines only (PREBUILD's), for AB
  wait; mkdir -p $OUT/table; cp $W/prebuild/gpu.jsonl $OUT/table/gpu.jsonl; echo "prebuild done at $(el)"
elif [ -n "$CASES" ]; then
  python3 tests/perf/bench_table.py gpu --out $OUT/table --logs $W/table --cases $CASES --budget_s ${BUDGET_S:-300} \
    > /dev/null 2> $W/table.log
  echo "table rc=$? at $(el)"; rm -rf $W/table/build-*.log
  python3 - $OUT/table/gpu.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["kind"] in ("ours", "peer"):
        print(r["name"][:40], r["batch"], r.get("input_len"), r.get("max_seq_len"), "ttft", r.get("ttft_ms"),
              "decode", r.get("decode_tok_s"), "total", r.get("total_tok_s"), "peak", r.get("peak_mem_GB"),
              r.get("first_token_s", ""), r.get("ready_s", ""))
    elif r["kind"] == "profile":
        print("profile", r["profile"][:30], r["batch"], r["gpu_us_per_step"], [(t["kernel"][:40], t["us_per_step"]) for t in r["top"][:6]])
    elif r["kind"] not in ("env", "build"):
        print(r)
PY
fi
if [ -n "$AB" ]; then
  batches=(); for b in ${AB_BATCHES//,/ }; do batches+=(--batch_size $b); done; AB_CASES=${AB_CASES:-tight}
  [ ${#batches[@]} == 0 ] && batches=(--batch_size 1 --batch_size 64)
  for case in ${AB_CASES//,/ }; do
    eng=$(python3 -c "import json, sys; print(next((r['engine'] for r in map(json.loads, open(sys.argv[1]))
          if r['kind'] == 'build' and r['name'] == sys.argv[2]), ''))" $OUT/table/gpu.jsonl $case)
    [ -z "$eng" ] && { echo "ab: no engine of case $case in the table (AB_CASES must be in CASES)"; continue; }
    IFS=';' read -ra variants <<< ";$AB"
    [ "$AB" == "-" ] && variants=("")  # AB=-: each case as is only
    for v in "${variants[@]}"; do
      t=$(( $(left) - 15 ))
      [ $t -lt $(( ${AB_NEED_S:-120} - 15 )) ] || [ $t -lt 1 ] && { echo "ab $case [$v] skipped: $(left) s of the call left"; continue; }
      read -ra words <<< "$v"; envs=(); flags=()
      for w in "${words[@]}"; do [[ ${#flags[@]} == 0 && $w == *=* && $w != -* ]] && envs+=("$w") || flags+=("$w"); done
      timeout $t env "${envs[@]}" python3 -m runtime.bench --engine_dir "$eng" --compile \
        "${batches[@]}" --input_len 128 --output_len 256 "${flags[@]}" > $W/ab.part 2>> $W/ab.log
      echo "ab $case [$v] rc=$? at $(el)"
      python3 -c "import json, sys
for line in open(sys.argv[1]):
    if line.startswith('{'):
        print(json.dumps({**json.loads(line), 'ab': sys.argv[2], 'case': sys.argv[3]}))" $W/ab.part "$v" $case >> $OUT/ab.jsonl
    done
  done
  [ -s $OUT/ab.jsonl ] && python3 -c "import json, sys
for r in map(json.loads, open(sys.argv[1])):
    if 'total_tok_s' in r:
        print(r['case'], repr(r['ab']), r['batch'], r['total_tok_s'], r['decode_ms_per_step'])" $OUT/ab.jsonl
fi
# torch.compile's mutation analysis failing on a kernel of ours (it then takes every input as written; 2026-12-07:
# the in-kernel split-K sum, fixed; tests/perf/trace_probe.py): said here, as the logs themselves come back packed
grep -rlF --include='*.log' "assuming every input is mutated" "$W" "$OUT" | sed 's/^/MUTATION ANALYSIS FAILED in: /'
# the device tool brings back 8 files at most (2026-12-07: the table's rows were left out twice, once when the call
# was cut before this packing): logs in one archive (a PREBUILD still running is stopped first: nothing of this
# call uses it now, and the store's writes are atomic)
jobs -p | xargs -r kill 2> /dev/null; wait
find "$OUT" -name '*.log' -exec mv --backup=numbered -t "$W" {} + 2> /dev/null  # (none expected there)
packed=$(cd "$W" && find . -name '*.log' -o -name 'gpu.jsonl' | sort)
[ -n "$packed" ] && (cd "$W" && tar czf "$OUT/logs.tgz" $packed)
find "$OUT" -mindepth 1 -type d -empty -delete
echo "done at $(el)"
