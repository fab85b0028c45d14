#!/bin/sh
# The image's entry point: `IMAGE preprocess --dataset ...` runs `python -m stages.preprocess --dataset ...`;
# anything else runs as given (`IMAGE python -m stages.preprocess ...`, `IMAGE sh`).
set -eu
if [ "$#" -eq 0 ]; then
  echo "usage: IMAGE STAGE [ARGS...]   (python -m stages.STAGE ARGS...)" >&2
  echo "       IMAGE COMMAND [ARGS...]" >&2
  exit 2
fi
# SEGADAPT_STAGES is the installed package folder (set by the Dockerfiles). A stage name wins over a
# program of the same name; the core package is no stage.
case $1 in
  */* | .* | core | __init__) is_stage=0 ;;
  *) if [ -f "${SEGADAPT_STAGES:?}/$1.py" ]; then is_stage=1; else is_stage=0; fi ;;
esac
if [ "$is_stage" -eq 1 ]; then
  stage=$1
  shift
  exec python -m "stages.$stage" "$@"
fi
exec "$@"
