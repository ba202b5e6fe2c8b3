#!/usr/bin/env bash
# Prepare the data (and, for whole_infer, the model) a TIPC mode needs. Offline: nothing is
# downloaded.
#
#   bash test_tipc/prepare.sh CONFIG MODE
#
# Layout under test_tipc/data/ (git-ignored; the configs point at these paths):
#   lite/tiles/           generated dataset (datasets.synthetic): 64 px, 8 train/good,
#                         3 test/good, 3 per defect type (scratch, spot) with masks
#   lite_infer/           the 9 lite test images, in one flat folder (inference input)
#   whole/magnetic_tile/  the magnetic-tile dataset in MVTec layout (datasets.magnetic_tile),
#                         converted from ../shared/data/magnetic_tile (relative to the repo
#                         root; TIPC_MAGNETIC_TILE_SRC=DIR overrides)
#   whole_infer/          10 images of each magnetic-tile test folder (60), flat
#   whole_model/<train_model_name>/magnetic_tile.npz
#                         whole_infer only: the config's infer_model, fitted here by the
#                         config's norm_train line on the whole data (with the config's
#                         --pretrained value; none offline). Delete the folder to refit.
#
# Modes: lite_train_lite_infer    lite + lite_infer
#        lite_train_whole_infer   lite + whole + whole_infer
#        whole_infer              whole + whole_infer + whole_model
#        whole_train_whole_infer  whole + whole_infer
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
[[ ${#lines[@]} -ge 53 ]] || usage "${FILENAME}: ${#lines[@]} lines, the format needs 53"


model_name=$(val 1)
python=$(val 2)
train_device_key=$(key 4)
size_key=$(key 6);         size_value=$(val 6)
save_model_key=$(key 7)
train_batch_key=$(key 8);  train_batch_value=$(val 8)
pretrain_key=$(key 9);     pretrain_value=$(val 9)
train_model_name=$(val 10)
data_key=$(key 12);        data_value=$(val 12)
category_key=$(key 13);    category_value=$(val 13)
norm_train=$(val 16)
infer_model=$(val 37)

DATA=./test_tipc/data
LITE_SIZE=64
WHOLE_INFER_PER_FOLDER=10
MT_SRC=${TIPC_MAGNETIC_TILE_SRC:-../shared/data/magnetic_tile}

log() { printf 'prepare.sh [%s %s]: %s\n' "${model_name}" "${MODE}" "$1"; }

# Generated data: one category, tiny images, a few per folder.
prepare_lite() {
    log "lite data in ${DATA}/lite (generated, ${LITE_SIZE} px)"
    "${python}" -m datasets.synthetic --dst "${DATA}/lite" --categories tiles \
        --size "${LITE_SIZE}" --n_train 8 --n_test_good 3 --n_test_defect 3 --seed 0 \
        || die "could not generate the lite data in ${DATA}/lite"
    flat_copy "${DATA}/lite/tiles/test" "${DATA}/lite_infer" 0
}

# The magnetic-tile dataset, converted once to MVTec layout.
prepare_whole() {
    if [[ ! -d ${MT_SRC} ]]; then
        die "the whole modes need the magnetic-tile dataset at ${MT_SRC} (relative to the repo
root ${REPO_ROOT}; it holds MT_Free, MT_Blowhole, ...). Put it there or set
TIPC_MAGNETIC_TILE_SRC=DIR; nothing is downloaded."
    fi
    log "whole data in ${DATA}/whole (from ${MT_SRC})"
    "${python}" -m datasets.magnetic_tile --src "${MT_SRC}" --dst "${DATA}/whole" \
        || die "could not convert ${MT_SRC} into ${DATA}/whole"
    flat_copy "${DATA}/whole/magnetic_tile/test" "${DATA}/whole_infer" "${WHOLE_INFER_PER_FOLDER}"
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

# The checkpoint whole_infer exports: fitted with the config's own training line.
prepare_whole_model() {
    if func_is_null "${infer_model}" || [[ ${infer_model} != *.npz ]]; then
        die "${FILENAME} line 38: infer_model must be the .npz checkpoint whole_infer exports"
    fi
    if [[ -f ${infer_model} ]]; then
        log "model ${infer_model} already fitted (delete it to refit)"
        return 0
    fi
    local save_path device cmd
    save_path=$(dirname "$(dirname "${infer_model}")")
    if [[ $(basename "$(dirname "${infer_model}")") != "${train_model_name}" ]]; then
        die "${FILENAME}: infer_model ${infer_model} is not in a folder named ${train_model_name}"
    fi
    if [[ $(basename "${infer_model}" .npz) != "${category_value}" ]]; then
        die "${FILENAME}: infer_model ${infer_model} is not named <${category_value}>.npz"
    fi
    device=cpu
    [[ $(func_has_cuda "${python}") == True ]] && device=gpu
    cmd=$(func_join "${python}" "${norm_train}" \
        "$(func_set_params "${train_device_key}" "${device}")" \
        "$(func_set_params "${data_key}" "${data_value}")" \
        "$(func_set_params "${category_key}" "${category_value}")" \
        "$(func_set_params "${size_key}" "${size_value}")" \
        "$(func_set_params "${train_batch_key}" "${train_batch_value}")" \
        "$(func_set_params "${pretrain_key}" "${pretrain_value}")" \
        "$(func_set_params "${save_model_key}" "${save_path}")")
    mkdir -p "${save_path}"
    local fit_log="${save_path}/${train_model_name}_fit.log"
    log "fitting the whole_infer model: ${cmd} > ${fit_log} 2>&1"
    if ! func_run_cmd "${cmd}" "${fit_log}"; then
        tail -n 20 "${fit_log}" >&2
        die "fitting the whole_infer model failed; see ${fit_log}"
    fi
    [[ -f ${infer_model} ]] || die "training wrote no ${infer_model}; see ${fit_log}"
    log "fitted ${infer_model}"
}

case ${MODE} in
    lite_train_lite_infer)
        prepare_lite ;;
    lite_train_whole_infer)
        prepare_lite
        prepare_whole ;;
    whole_infer)
        prepare_whole
        prepare_whole_model ;;
    whole_train_whole_infer)
        prepare_whole ;;
esac

[[ -d ${data_value}/${category_value} ]] \
    || die "the config's data (${data_value}/${category_value}) is not what prepare.sh builds"
log "ready"
