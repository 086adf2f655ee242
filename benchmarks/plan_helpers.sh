# Helpers sourced by benchmarks/session1*_plan.sh (each run is one process, its log and JSON under $OUT).
export PYTHONUNBUFFERED=1
bench() {  # tag, timeout, `adsa-jax bench` arguments: a sweep in one process
  echo "== $1"; timeout $2 python3 -m adsa_jax.cli bench $3 --iters 3 --segments 1 --json $OUT/$1.json > $OUT/$1.log 2>&1
  echo rc $?; grep -E "GPT-|rror" $OUT/$1.log | tail -n 4
}
one() {  # tag, timeout, plan item, KERNELS settings: one configuration of gpu_explore.py
  echo "== $1 $4"; env KERNELS=$4 WORKERS=1 TAG=$1 timeout $2 python3 benchmarks/gpu_explore.py "[$3]" > $OUT/$1.log 2>&1
  echo rc $?; grep -E "GPT-|rror|device busy" $OUT/$1.log | tail -n 2
}
g() { echo "{\"model\":\"GPT-XL\",\"size\":$1,\"batch\":$2,\"policy\":\"$3\",\"iters\":$4$5}"; }  # a GPT-XL plan item
