#!/usr/bin/env bash
# Prepare the data (and, for whole_infer, the model) a TIPC mode needs. Offline: nothing is
# downloaded.
#
#   bash test_tipc/prepare.sh CONFIG MODE
#
# The configs name fixed paths, the same in every mode (the standard layout has no per-mode data
# line); this script points them at the mode's data:
#   <--data_path>/<--category> of the config's train line (./test_tipc/data/train_data/tile):
#                         a symbolic link to the mode's training dataset, lite or whole below
#   train_infer_img_dir (line 12) and the inference --input_file (line 48)
#                         (./test_tipc/data/infer_data): the mode's inference images, flat
#   --teacher FILE of the train line (EfficientAD, PUAD): a PDN distilled from a random resnet18
#                         on the mode's training images (models.efficientad.distill, 100 steps;
#                         10 in lite_train_lite_infer)
#   infer_model (line 37, whole_infer only; ./test_tipc/data/whole_model/<model_name>):
#                         a model fitted by the config's train line on the whole data and
#                         exported there by its export line. Delete the folder to refit.
# and keeps the datasets themselves, built once, under test_tipc/data/ (git-ignored):
#   lite/tiles/           generated dataset (datasets.synthetic): 64 px, 8 train/good,
#                         3 test/good, 3 per defect type (scratch, spot) with masks
#   whole/magnetic_tile/  the magnetic-tile dataset in MVTec layout (datasets.magnetic_tile),
#                         converted from ../shared/data/magnetic_tile (relative to the repo
#                         root; TIPC_MAGNETIC_TILE_SRC=DIR overrides)
#
# Modes: lite_train_lite_infer    train on lite, infer on its 9 test images
#        lite_train_whole_infer   train on lite, infer on 10 images of each whole test folder (60)
#        whole_infer              whole data, the 60 images, the fitted and exported model
#        whole_train_whole_infer  train on whole, infer on the 60 images
# The paths are shared by every config: prepare and run one mode at a time.
# Exit status: 0 when everything is ready, 1 when something is missing or a step fails,
# 2 on a wrong invocation.

set -euo pipefail

TIPC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=test_tipc/common_func.sh
source "${TIPC_DIR}/common_func.sh"

usage() {
    printf 'usage: bash test_tipc/prepare.sh CONFIG MODE\n' >&2
    printf '  MODE: %s\n' "${TIPC_MODES[*]}" >&2
    printf 'error: %s\n' "$1" >&2
    exit 2
}

die() {
    printf 'prepare.sh: error: %s\n' "$1" >&2
    exit 1
}

[[ $# -eq 2 ]] || usage "CONFIG and MODE are required"
FILENAME=$1
MODE=$2
func_is_mode "${MODE}" || usage "unknown mode '${MODE}'"
[[ -f ${FILENAME} && -r ${FILENAME} ]] || usage "config '${FILENAME}' not found"
FILENAME=$(cd "$(dirname "${FILENAME}")" && pwd)/$(basename "${FILENAME}")

REPO_ROOT=$(cd "${TIPC_DIR}/.." && pwd)
cd "${REPO_ROOT}"

declare -a lines
func_read_config "${FILENAME}" lines
layout_error=$(func_check_layout lines "${FILENAME}") || usage "${layout_error}"

# The standard layout, read as Paddle's generic driver reads it (TIPC_LINE_MAP in common_func.sh).
# shellcheck disable=SC2154  # the variables are set by func_parse_layout
func_parse_layout
infer_model=${infer_model_list%%|*}  # the first model of line 37: the one prepare.sh fits

# word_after FLAG WORDS...: the word that follows FLAG (as "FLAG VALUE" or "FLAG=VALUE").
word_after() {
    local flag=$1 word take=""
    shift
    for word in "$@"; do
        if [[ -n ${take} ]]; then printf '%s\n' "${word}"; return 0; fi
        if [[ ${word} == "${flag}="* ]]; then printf '%s\n' "${word#*=}"; return 0; fi
        [[ ${word} == "${flag}" ]] && take=1
    done
    return 1
}
read -r -a train_words <<< "${norm_train}"
data_path=$(word_after --data_path "${train_words[@]}") \
    || usage "${FILENAME} line 16: the train line needs --data_path"
category=$(word_after --category "${train_words[@]}") \
    || usage "${FILENAME} line 16: the train line needs --category"
[[ ${category} =~ ^[A-Za-z0-9_.-]+$ ]] \
    || usage "${FILENAME} line 16: --category ${category} must name one category"

DATA=./test_tipc/data
LITE_SIZE=64
WHOLE_INFER_PER_FOLDER=10
MT_SRC=${TIPC_MAGNETIC_TILE_SRC:-../shared/data/magnetic_tile}

log() { printf 'prepare.sh [%s %s]: %s\n' "${model_name}" "${MODE}" "$1"; }

# Generated data: one category, tiny images, a few per folder.
build_lite() {
    log "lite data in ${DATA}/lite (generated, ${LITE_SIZE} px)"
    "${python}" -m datasets.synthetic --dst "${DATA}/lite" --categories tiles \
        --size "${LITE_SIZE}" --n_train 8 --n_test_good 3 --n_test_defect 3 --seed 0 \
        || die "could not generate the lite data in ${DATA}/lite"
}

# The magnetic-tile dataset, converted once to MVTec layout.
build_whole() {
    if [[ ! -d ${MT_SRC} ]]; then
        die "the whole modes need the magnetic-tile dataset at ${MT_SRC} (relative to the repo
root ${REPO_ROOT}; it holds MT_Free, MT_Blowhole, ...). Put it there or set
TIPC_MAGNETIC_TILE_SRC=DIR; nothing is downloaded."
    fi
    log "whole data in ${DATA}/whole (from ${MT_SRC})"
    "${python}" -m datasets.magnetic_tile --src "${MT_SRC}" --dst "${DATA}/whole" \
        || die "could not convert ${MT_SRC} into ${DATA}/whole"
}

# link_train_data DATASET_DIR: make <data_path>/<category> a link to DATASET_DIR.
link_train_data() {
    local target link=${data_path}/${category}
    target=$(cd "$1" && pwd)
    mkdir -p "${data_path}"
    if [[ -e ${link} && ! -L ${link} ]]; then
        rm -rf "${link}"
    fi
    ln -sfn "${target}" "${link}"
    log "training data ${link} -> ${target}"
}

# flat_copy TEST_DIR DST LIMIT: copy the images of every TEST_DIR/<folder> into DST as
# <folder>_<name> (the first LIMIT in name order of each folder; 0 = all). DST is rebuilt.
flat_copy() {
    local src=$1 dst=$2 limit=$3 folder file count
    rm -rf "${dst}"
    mkdir -p "${dst}"
    for folder in "${src}"/*/; do
        folder=${folder%/}
        count=0
        while IFS= read -r file; do
            cp "${file}" "${dst}/$(basename "${folder}")_$(basename "${file}")"
            count=$((count + 1))
            if [[ ${limit} -gt 0 && ${count} -ge ${limit} ]]; then
                break
            fi
        done < <(find "${folder}" -maxdepth 1 -type f \
            \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' \) | LC_ALL=C sort)
    done
    count=$(find "${dst}" -type f | wc -l)
    [[ ${count} -gt 0 ]] || die "no test images found under ${src}"
    log "${count} inference images in ${dst}"
}

# infer_images TEST_DIR LIMIT: the mode's inference images into line 12's and line 48's folders.
infer_images() {
    func_is_null "${train_infer_img_dir}" || flat_copy "$1" "${train_infer_img_dir}" "$2"
    if ! func_is_null "${infer_img_dir}" && [[ ${infer_img_dir} != "${train_infer_img_dir}" ]]; then
        flat_copy "$1" "${infer_img_dir}" "$2"
    fi
}

# run_step WHAT LOG WORD...: run a command into LOG; on failure show LOG's end and stop.
run_step() {
    local what=$1 step_log=$2 cmd
    shift 2
    cmd=$(func_join "$@")
    log "${what}: ${cmd} > ${step_log} 2>&1"
    if ! func_run_cmd "${cmd}" "${step_log}"; then
        tail -n 20 "${step_log}" >&2
        die "${what} failed; see ${step_log}"
    fi
}

# The model whole_infer runs: fitted by the config's train line (on the CPU, or the GPU when
# Paddle has CUDA) into infer_model, then exported there, as the training modes do it.
prepare_whole_model() {
    if func_is_null "${infer_model}"; then
        die "${FILENAME} line 37: infer_model is null; whole_infer needs the model folder"
    fi
    if [[ -f ${infer_model}/deploy.json ]]; then
        log "model ${infer_model} already fitted and exported (delete it to refit)"
        return 0
    fi
    local device=cpu
    [[ $(func_has_cuda "${python}") == True ]] && device=gpu
    mkdir -p "${infer_model}"
    run_step "fitting the whole_infer model" "${infer_model}/fit.log" "${python}" "${norm_train}" \
        "$(func_set_params "${train_device_key}" "${device}")" \
        "$(func_set_params "${save_model_key}" "${infer_model}")" \
        "$(func_set_params "${epoch_key}" "${epoch_value}")" \
        "$(func_set_params "${pretrain_key}" "${pretrain_value}")" \
        "$(func_set_params "${train_batch_key}" "${train_batch_value}")" \
        "$(func_set_params "${train_key1}" "${train_value1}")"
    run_step "exporting the whole_infer model" "${infer_model}/export.log" "${python}" \
        "${norm_export}" \
        "$(func_set_params "${export_weight_key}" "${infer_model}/${train_model_name}")" \
        "$(func_set_params "${save_infer_key}" "${infer_model}")"
    [[ -f ${infer_model}/deploy.json ]] || die "the export wrote no ${infer_model}/deploy.json"
    log "fitted and exported ${infer_model}"
}

# The teacher a train line names (--teacher FILE: EfficientAD, PUAD), distilled once from a random
# resnet18 (--pretrained none: offline) on the mode's training images, at the train line's --resize.
prepare_teacher() {
    local teacher size arch side steps=100
    teacher=$(word_after --teacher "${train_words[@]}") || return 0
    [[ ${MODE} == lite_train_lite_infer ]] && steps=10  # the lite chain only has to run
    if [[ -f ${teacher} && $(cat "${teacher%.npz}.steps" 2>/dev/null) == "${steps}" ]]; then
        log "teacher ${teacher} already distilled in ${steps} steps (delete it to distil again)"
        return 0
    fi
    size=$(word_after --size "${train_words[@]}") || size=s
    arch=$(word_after --arch "${train_words[@]}") || arch=resnet18
    side=$(word_after --resize "${train_words[@]}") || side=256
    mkdir -p "$(dirname "${teacher}")"
    run_step "distilling the teacher" "${teacher%.npz}.log" "${python}" -m models.efficientad.distill \
        --images "${data_path}/${category}/train" --arch "${arch}" --pretrained none --size "${size}" \
        --image_size "${side}" --steps "${steps}" --batch_size 4 --norm_images 0 --out "${teacher}" \
        && echo "${steps}" > "${teacher%.npz}.steps"
}

case ${MODE} in
    lite_train_lite_infer)
        build_lite
        link_train_data "${DATA}/lite/tiles"
        infer_images "${DATA}/lite/tiles/test" 0 ;;
    lite_train_whole_infer)
        build_lite
        build_whole
        link_train_data "${DATA}/lite/tiles"
        infer_images "${DATA}/whole/magnetic_tile/test" "${WHOLE_INFER_PER_FOLDER}" ;;
    whole_infer)
        build_whole
        link_train_data "${DATA}/whole/magnetic_tile"
        infer_images "${DATA}/whole/magnetic_tile/test" "${WHOLE_INFER_PER_FOLDER}"
        prepare_teacher
        prepare_whole_model ;;
    whole_train_whole_infer)
        build_whole
        link_train_data "${DATA}/whole/magnetic_tile"
        infer_images "${DATA}/whole/magnetic_tile/test" "${WHOLE_INFER_PER_FOLDER}" ;;
esac
[[ ${MODE} == whole_infer ]] || prepare_teacher
log "ready"
