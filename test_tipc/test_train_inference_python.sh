#!/usr/bin/env bash
# TIPC driver: train -> eval -> export -> Paddle Inference, as a config file describes.
#
#   bash test_tipc/test_train_inference_python.sh CONFIG MODE [GPUID]
#
# CONFIG  test_tipc/configs/<Model>/train_infer_python.txt (read by line number, see
#         test_tipc/docs/test_train_inference_python.md)
# MODE    lite_train_lite_infer | lite_train_whole_infer | whole_infer | whole_train_whole_infer
# GPUID   whole_infer only: CUDA_VISIBLE_DEVICES for the export and inference commands
#
# Run `bash test_tipc/prepare.sh CONFIG MODE` first. Every command's stdout and stderr go to a
# log file in test_tipc/output/<model_name>/<MODE>/, and one line per command is appended to
# results_python.log there: "Run successfully with command - CMD!" or "Run failed with command -
# CMD!" ("Skipped (...) with command - CMD!" for GPU commands on a build without CUDA). Failed
# steps do not stop the run and do not change the exit status (TIPC convention: CI greps the
# log). Only a wrong invocation (unknown mode, unreadable or malformed config) exits with 2.

set -uo pipefail

TIPC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=test_tipc/common_func.sh
source "${TIPC_DIR}/common_func.sh"

usage() {
    printf 'usage: bash test_tipc/test_train_inference_python.sh CONFIG MODE [GPUID]\n' >&2
    printf '  MODE: %s\n' "${TIPC_MODES[*]}" >&2
    printf 'error: %s\n' "$1" >&2
    exit 2
}

[[ $# -ge 2 ]] || usage "CONFIG and MODE are required"
FILENAME=$1
MODE=$2
GPUID=${3:-}
func_is_mode "${MODE}" || usage "unknown mode '${MODE}'"
[[ -f ${FILENAME} && -r ${FILENAME} ]] || usage "config '${FILENAME}' not found"
FILENAME=$(cd "$(dirname "${FILENAME}")" && pwd)/$(basename "${FILENAME}")

# Every path in a config is relative to the repository root.
cd "${TIPC_DIR}/.." || usage "cannot enter the repository root"

declare -a lines
func_read_config "${FILENAME}" lines
[[ ${#lines[@]} -ge 53 ]] || usage "${FILENAME}: ${#lines[@]} lines, the format needs 53"
[[ ${lines[0]} == *train_params* && ${lines[23]} == *eval_params* \
    && ${lines[27]} == *infer_params* ]] \
    || usage "${FILENAME}: section headers must be on lines 1, 24 and 28"


# ---- train_params (lines 1-23; array index = line number - 1) ----
model_name=$(val 1)
python=$(val 2)
gpu_list=$(val 3)
train_device_key=$(key 4);    train_device_list=$(val 4)
autocast_key=$(key 5);        autocast_list=$(val 5)
size_key=$(key 6);            size_value=$(val 6)
save_model_key=$(key 7)
train_batch_key=$(key 8);     train_batch_value=$(val 8)
pretrain_key=$(key 9);        pretrain_value=$(val 9)
train_model_name=$(val 10)
train_infer_img_dir=$(val 11)
data_key=$(key 12);           data_value=$(val 12)
category_key=$(key 13);       category_value=$(val 13)
trainer_list=$(val 15)
norm_train=$(val 16)
pact_train=$(val 17)
fpgm_train=$(val 18)
distill_train=$(val 19)
trainer_key1=$(key 20);       trainer_value1=$(val 20)
trainer_key2=$(key 21);       trainer_value2=$(val 21)
# ---- eval_params (lines 24-27) ----
eval_py=$(val 24)
eval_key1=$(key 25);          eval_value1=$(val 25)
# ---- infer_params (lines 28-53) ----
save_infer_key=$(key 28)
export_weight_key=$(key 29)
norm_export=$(val 30)
pact_export=$(val 31)
fpgm_export=$(val 32)
distill_export=$(val 33)
export_key1=$(key 34);        export_value1=$(val 34)
export_key2=$(key 35);        export_value2=$(val 35)
inference_dir=$(val 36)
infer_model_list=$(val 37)
infer_export_list=$(val 38)
infer_quant_list=$(val 39)
inference_py=$(val 40)
use_gpu_key=$(key 41);        use_gpu_list=$(val 41)
use_mkldnn_key=$(key 42);     use_mkldnn_list=$(val 42)
cpu_threads_key=$(key 43);    cpu_threads_list=$(val 43)
batch_size_key=$(key 44);     batch_size_list=$(val 44)
use_trt_key=$(key 45);        use_trt_list=$(val 45)
precision_key=$(key 46);      precision_list=$(val 46)
model_file_key=$(key 47);     model_file_value=$(val 47)
params_file_key=$(key 48);    params_file_value=$(val 48)
image_dir_key=$(key 49);      infer_img_dir=$(val 49)
save_log_key=$(key 50);       save_log_value=$(val 50)
benchmark_key=$(key 51);      benchmark_value=$(val 51)
infer_key1=$(key 52);         infer_value1=$(val 52)

[[ ${model_name} =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
    || usage "${FILENAME}: model_name '${model_name}' must be a plain name (line 2)"
func_is_null "${python}" && usage "${FILENAME}: python is null (line 3)"

LOG_PATH="./test_tipc/output/${model_name}/${MODE}"
rm -rf "${LOG_PATH}"
mkdir -p "${LOG_PATH}"
status_log="${LOG_PATH}/results_python.log"
: > "${status_log}"

has_cuda=$(func_has_cuda "${python}")
no_cuda_reason="Paddle is not compiled with CUDA"
printf 'TIPC %s %s: logs in %s (Paddle with CUDA: %s)\n' \
    "${model_name}" "${MODE}" "${LOG_PATH}" "${has_cuda}"

is_true() { [[ $1 == True || $1 == true || $1 == gpu ]]; }

# func_inference SCRIPT MODEL_DIR IMG_DIR IS_QUANT TAG: one inference command per combination
# of the configured values (use_gpu x mkldnn x threads x batch x precision on the CPU,
# use_gpu x tensorrt x precision x batch on the GPU).
func_inference() {
    local script=$1 model_dir=$2 img_dir=$3 is_quant=$4 tag=$5
    local use_gpu use_mkldnn threads batch_size precision use_trt run_tag cmd log
    local -a use_gpus mkldnns threads_list batch_sizes precisions trts
    func_split_list "${use_gpu_list}" use_gpus
    func_split_list "${use_mkldnn_list}" mkldnns
    func_split_list "${cpu_threads_list}" threads_list
    func_split_list "${batch_size_list}" batch_sizes
    func_split_list "${precision_list}" precisions
    func_split_list "${use_trt_list}" trts
    local set_model set_params set_input set_benchmark set_key1
    set_model=$(func_set_params "${model_file_key}" "${model_dir}/${model_file_value}")
    func_is_null "${model_file_value}" && set_model=$(func_set_params "${model_file_key}" "${model_dir}")
    set_params=$(func_set_params "${params_file_key}" "${model_dir}/${params_file_value}")
    func_is_null "${params_file_value}" && set_params=""
    set_input=$(func_set_params "${image_dir_key}" "${img_dir}")
    set_benchmark=$(func_set_params "${benchmark_key}" "${benchmark_value}")
    set_key1=$(func_set_params "${infer_key1}" "${infer_value1}")
    for use_gpu in "${use_gpus[@]}"; do
        if is_true "${use_gpu}"; then
            for use_trt in "${trts[@]}"; do
                for precision in "${precisions[@]}"; do
                    # fp16 and int8 need TensorRT; a quantised model runs in int8 only
                    if [[ ${precision} != fp32 ]] && ! is_true "${use_trt}"; then continue; fi
                    if is_true "${is_quant}" && [[ ${precision} != int8 ]]; then continue; fi
                    if ! is_true "${is_quant}" && [[ ${precision} == int8 ]]; then continue; fi
                    for batch_size in "${batch_sizes[@]}"; do
                        run_tag="python_infer_gpu_${tag}_usetrt_${use_trt}_precision_${precision}_batchsize_${batch_size}"
                        log="${LOG_PATH}/${run_tag}.log"
                        cmd=$(func_join "${python}" "${script}" \
                            "$(func_set_params "${use_gpu_key}" "${use_gpu}")" \
                            "$(func_set_params "${use_trt_key}" "${use_trt}")" \
                            "$(func_set_params "${precision_key}" "${precision}")" \
                            "$(func_set_params "${batch_size_key}" "${batch_size}")" \
                            "${set_model}" "${set_params}" "${set_input}" \
                            "$(func_infer_save "${run_tag}")" "${set_benchmark}" "${set_key1}")
                        func_run_logged "${cmd}" "${log}" gpu
                    done
                done
            done
        else
            for use_mkldnn in "${mkldnns[@]}"; do
                for threads in "${threads_list[@]}"; do
                    for batch_size in "${batch_sizes[@]}"; do
                        for precision in "${precisions[@]}"; do
                            # on the CPU, fp16 needs oneDNN; a quantised model runs in int8 only
                            if [[ ${precision} == fp16 ]] && ! is_true "${use_mkldnn}"; then continue; fi
                            if is_true "${is_quant}" && [[ ${precision} != int8 ]]; then continue; fi
                            if ! is_true "${is_quant}" && [[ ${precision} == int8 ]]; then continue; fi
                            run_tag="python_infer_cpu_${tag}_usemkldnn_${use_mkldnn}_threads_${threads}_precision_${precision}_batchsize_${batch_size}"
                            log="${LOG_PATH}/${run_tag}.log"
                            cmd=$(func_join "${python}" "${script}" \
                                "$(func_set_params "${use_gpu_key}" "${use_gpu}")" \
                                "$(func_set_params "${use_mkldnn_key}" "${use_mkldnn}")" \
                                "$(func_set_params "${cpu_threads_key}" "${threads}")" \
                                "$(func_set_params "${precision_key}" "${precision}")" \
                                "$(func_set_params "${batch_size_key}" "${batch_size}")" \
                                "${set_model}" "${set_params}" "${set_input}" \
                                "$(func_infer_save "${run_tag}")" "${set_benchmark}" "${set_key1}")
                            func_run_logged "${cmd}" "${log}" cpu
                        done
                    done
                done
            done
        fi
    done
}

# func_infer_save RUN_TAG -> the inference output argument: LOG_PATH/<save_path value>/RUN_TAG.
func_infer_save() {
    if func_is_null "${save_log_key}" || func_is_null "${save_log_value}"; then
        printf '\n'
    else
        func_set_params "${save_log_key}" "${LOG_PATH}/${save_log_value}/$1"
    fi
}

# func_run_logged "CMD" LOG cpu|gpu: run CMD into LOG and record the result; a GPU command on a
# build without CUDA is recorded as skipped instead.
func_run_logged() {
    local cmd=$1 log=$2 device=$3
    if [[ ${device} == gpu && ${has_cuda} != True ]]; then
        status_skip "${no_cuda_reason}" "${cmd} > ${log} 2>&1" "${status_log}"
        return 0
    fi
    func_run_cmd "${cmd}" "${log}"
    local status=$?
    status_check "${status}" "${cmd} > ${log} 2>&1" "${status_log}" "${log}"
    return "${status}"
}

# func_export SCRIPT WEIGHTS SAVE_DIR LOG ENV_PREFIX DEVICE -> status of the export command.
func_export() {
    local cmd
    cmd=$(func_join "$5" "${python}" "$1" \
        "$(func_set_params "${export_weight_key}" "$2")" \
        "$(func_set_params "${save_infer_key}" "$3")" \
        "$(func_set_params "${export_key1}" "${export_value1}")" \
        "$(func_set_params "${export_key2}" "${export_value2}")")
    func_run_logged "${cmd}" "$4" "$6"
}

# func_skip_inference REASON TAG: record the inference commands that cannot run.
func_skip_inference() {
    local reason=$1 tag=$2
    status_skip "${reason}" "${python} ${inference_py} (every ${tag} combination)" "${status_log}"
}

if [[ ${MODE} == whole_infer ]]; then
    # No training: export each infer_model checkpoint (unless infer_export is null: then
    # infer_model is already an exported folder) and run inference on the whole infer data.
    if [[ -n ${GPUID} ]]; then
        export CUDA_VISIBLE_DEVICES=${GPUID}
    fi
    declare -a infer_models infer_exports infer_quants
    func_split_list "${infer_model_list}" infer_models
    func_split_list "${infer_export_list}" infer_exports
    func_split_list "${infer_quant_list}" infer_quants
    for idx in "${!infer_models[@]}"; do
        infer_model=${infer_models[idx]}
        export_py=${infer_exports[idx]:-${infer_exports[0]}}
        is_quant=${infer_quants[idx]:-${infer_quants[0]}}
        func_is_null "${infer_model}" && continue
        if ! func_is_null "${export_py}"; then
            save_infer_dir="${LOG_PATH}/inference_${idx}"
            if ! func_export "${export_py}" "${infer_model}" "${save_infer_dir}" \
                "${LOG_PATH}/export_${idx}.log" "" cpu; then
                func_skip_inference "export failed" "model ${idx}"
                continue
            fi
        else
            save_infer_dir=${infer_model}
        fi
        model_dir=${save_infer_dir}
        func_is_null "${inference_dir}" || model_dir="${save_infer_dir}/${inference_dir}"
        func_inference "${inference_py}" "${model_dir}" "${infer_img_dir}" "${is_quant}" \
            "gpus_${GPUID:-default}_model_${idx}"
    done
else
    declare -a gpus devices autocasts trainers
    func_split_list "${gpu_list}" gpus
    func_split_list "${train_device_list}" devices
    func_split_list "${autocast_list}" autocasts
    func_split_list "${trainer_list}" trainers
    for idx in "${!gpus[@]}"; do
        gpu=${gpus[idx]}
        device=${devices[idx]:-}
        if [[ ${gpu} == -1 ]]; then
            env_prefix=""
            launcher=""
            device=${device:-cpu}
            device_kind=cpu
        elif [[ ${gpu} == *,* ]]; then
            # several GPUs: one process per GPU through Paddle's launcher
            env_prefix=""
            launcher="-m paddle.distributed.launch --devices ${gpu}"
            device=${device:-gpu}
            device_kind=gpu
        else
            env_prefix="env CUDA_VISIBLE_DEVICES=${gpu}"
            launcher=""
            device=${device:-gpu}
            device_kind=gpu
        fi
        for autocast in "${autocasts[@]}"; do
            for trainer in "${trainers[@]}"; do
                case ${trainer} in
                    norm_train) train_py=${norm_train}; export_py=${norm_export}; is_quant=False ;;
                    pact_train) train_py=${pact_train}; export_py=${pact_export}; is_quant=True ;;
                    fpgm_train) train_py=${fpgm_train}; export_py=${fpgm_export}; is_quant=False ;;
                    distill_train) train_py=${distill_train}; export_py=${distill_export}; is_quant=False ;;
                    *) train_py=null; export_py=null; is_quant=False ;;
                esac
                if func_is_null "${train_py}"; then
                    printf 'trainer %s: null in the config, skipped\n' "${trainer}"
                    continue
                fi
                tag="${trainer}_gpus_${gpu}_autocast_${autocast}"
                save_dir="${LOG_PATH}/${tag}"
                train_log="${LOG_PATH}/${tag}.log"
                cmd=$(func_join "${env_prefix}" "${python}" "${launcher}" "${train_py}" \
                    "$(func_set_params "${train_device_key}" "${device}")" \
                    "$(func_set_params "${autocast_key}" "${autocast}")" \
                    "$(func_set_params "${data_key}" "${data_value}")" \
                    "$(func_set_params "${category_key}" "${category_value}")" \
                    "$(func_set_params "${size_key}" "${size_value}")" \
                    "$(func_set_params "${train_batch_key}" "${train_batch_value}")" \
                    "$(func_set_params "${pretrain_key}" "${pretrain_value}")" \
                    "$(func_set_params "${save_model_key}" "${save_dir}")" \
                    "$(func_set_params "${trainer_key1}" "${trainer_value1}")" \
                    "$(func_set_params "${trainer_key2}" "${trainer_value2}")")
                if [[ ${device_kind} == gpu && ${has_cuda} != True ]]; then
                    status_skip "${no_cuda_reason}; its eval, export and inference too" \
                        "${cmd} > ${train_log} 2>&1" "${status_log}"
                    continue
                fi
                if ! func_run_logged "${cmd}" "${train_log}" "${device_kind}"; then
                    func_skip_inference "training failed" "${tag}"
                    continue
                fi
                model_folder="${save_dir}/${train_model_name}"
                if ! func_is_null "${eval_py}"; then
                    cmd=$(func_join "${env_prefix}" "${python}" "${eval_py}" \
                        "$(func_set_params "${train_device_key}" "${device}")" \
                        "$(func_set_params "${data_key}" "${data_value}")" \
                        "$(func_set_params "${category_key}" "${category_value}")" \
                        "$(func_set_params "${size_key}" "${size_value}")" \
                        "$(func_set_params "${train_batch_key}" "${train_batch_value}")" \
                        "$(func_set_params "${export_weight_key}" "${model_folder}")" \
                        "$(func_set_params "${eval_key1}" "${eval_value1}")")
                    func_run_logged "${cmd}" "${LOG_PATH}/${tag}_eval.log" "${device_kind}"
                fi
                if func_is_null "${export_py}"; then
                    printf '%s: export is null in the config; inference skipped\n' "${trainer}"
                    continue
                fi
                save_infer_dir="${save_dir}/inference"
                if ! func_export "${export_py}" "${model_folder}/${category_value}.npz" \
                    "${save_infer_dir}" "${LOG_PATH}/${tag}_export.log" "${env_prefix}" \
                    "${device_kind}"; then
                    func_skip_inference "export failed" "${tag}"
                    continue
                fi
                model_dir=${save_infer_dir}
                func_is_null "${inference_dir}" || model_dir="${save_infer_dir}/${inference_dir}"
                func_inference "${inference_py}" "${model_dir}" "${train_infer_img_dir}" \
                    "${is_quant}" "gpus_${gpu}"
            done
        done
    done
fi

n_ok=$(grep -c '^Run successfully' "${status_log}")
n_failed=$(grep -c '^Run failed' "${status_log}")
n_skipped=$(grep -c '^Skipped' "${status_log}")
printf 'TIPC %s %s: %s successful, %s failed, %s skipped; see %s\n' \
    "${model_name}" "${MODE}" "${n_ok}" "${n_failed}" "${n_skipped}" "${status_log}"
exit 0
