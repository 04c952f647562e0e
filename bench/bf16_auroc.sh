#!/bin/bash
# bf16 against f32 on the demo data (256 px, MobileNetV2 ImageNet weights, PADIM): the fit's frozen network
# (`train --precision`) and `export --precision auto` (which measures the exported network in both and chooses).
# Usage: bash bench/bf16_auroc.sh [WORK_DIR]   (from the repository root; demo data generated there on first use)
set -e
W=${1:-/tmp/da_bf16}
PY=${PYTHON:-.venv/bin/python}
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
[ -d "$W/demo/washer" ] || $PY -m distributed_anomaly synth "$W/demo" --quiet
for cat in washer tile; do
  for prec in f32 bf16; do
    $PY -m distributed_anomaly train --data "$W/demo/$cat" --model padim --backbone mobilenet_v2 --precision $prec \
      --out "$W/runs/${cat}_padim_$prec" --overwrite --quiet > "$W/train_${cat}_$prec.log" 2>&1
    $PY -c "import json, sys; m = json.load(open(sys.argv[1] + '/metrics.json')); c = json.load(open(sys.argv[1] + '/config.json'))
print(sys.argv[2], 'padim', sys.argv[3], 'image_auroc', round(m['image_auroc'], 4), 'pixel_auroc', round(m['pixel_auroc'], 4),
      'fit_seconds', c['info'].get('fit_seconds'), 'frozen_precision', c['info'].get('frozen_precision'))" \
      "$W/runs/${cat}_padim_$prec" $cat $prec
  done
  $PY -m distributed_anomaly export --run "$W/runs/${cat}_padim_f32" --out "$W/ir/${cat}_padim_auto" --precision auto > /dev/null
  $PY -c "import json, sys; m = json.load(open(sys.argv[1] + '/metadata.json')); print(sys.argv[2], 'export auto:', m['precision'], m['inference_precision'], m['bf16_check'])" \
    "$W/ir/${cat}_padim_auto" $cat
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
