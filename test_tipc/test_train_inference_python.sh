#!/usr/bin/env bash
# TIPC driver: train -> eval -> export -> Paddle Inference, as a config file describes.
#
#   bash test_tipc/test_train_inference_python.sh CONFIG MODE [GPUID]
#
# CONFIG  test_tipc/configs/<Model>/train_infer_python.txt, in the standard 51-line layout of
#         Paddle's generic TIPC driver, read by line number as that driver reads it and turned
#         into the same commands (see test_tipc/docs/test_train_inference_python.md)
# MODE    lite_train_lite_infer | lite_train_whole_infer | whole_infer | whole_train_whole_infer
# GPUID   whole_infer only: CUDA_VISIBLE_DEVICES for the export and inference commands
#
# Run `bash test_tipc/prepare.sh CONFIG MODE` first. Every command's stdout and stderr go to a
# log file in test_tipc/output/<model_name>/<MODE>/, and one line per command is appended to
# results_python.log there: "Run successfully with command - CMD!" or "Run failed with command -
# CMD!" ("Skipped (...) with command - CMD!" for GPU commands on a build without CUDA, where the
# standard driver would run them and fail). Failed
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
layout_error=$(func_check_layout lines "${FILENAME}") || usage "${layout_error}"

# The standard layout, read as Paddle's generic driver reads it (TIPC_LINE_MAP in common_func.sh).
# shellcheck disable=SC2154  # the variables are set by func_parse_layout
func_parse_layout

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
# use_gpu x tensorrt x precision x batch on the GPU), the model passed as its export folder.
func_inference() {
    local script=$1 model_dir=$2 img_dir=$3 is_quant=$4 tag=$5
    local use_gpu use_mkldnn threads batch_size precision use_trt run_tag cmd
    local -a use_gpus mkldnns threads_list batch_sizes precisions trts
    func_split_list "${use_gpu_list}" use_gpus
    func_split_list "${use_mkldnn_list}" mkldnns
    func_split_list "${cpu_threads_list}" threads_list
    func_split_list "${batch_size_list}" batch_sizes
    func_split_list "${precision_list}" precisions
    func_split_list "${use_trt_list}" trts
    local set_model set_input set_benchmark set_key1
    set_model=$(func_set_params "${infer_model_key}" "${model_dir}")
    set_input=$(func_set_params "${image_dir_key}" "${img_dir}")
    set_benchmark=$(func_set_params "${benchmark_key}" "${benchmark_value}")
    set_key1=$(func_set_params "${infer_key1}" "${infer_value1}")
    for use_gpu in "${use_gpus[@]}"; do
        if is_true "${use_gpu}"; then
            for use_trt in "${trts[@]}"; do
                for precision in "${precisions[@]}"; do
                    # fp16 and int8 need TensorRT; int8 is for a quantised model only
                    if [[ ${precision} != fp32 ]] && ! is_true "${use_trt}"; then continue; fi
                    if ! is_true "${is_quant}" && [[ ${precision} == int8 ]]; then continue; fi
                    for batch_size in "${batch_sizes[@]}"; do
                        run_tag="python_infer_gpu_${tag}_usetrt_${use_trt}_precision_${precision}_batchsize_${batch_size}"
                        cmd=$(func_join "${python}" "${script}" \
                            "$(func_set_params "${use_gpu_key}" "${use_gpu}")" \
                            "$(func_set_params "${use_trt_key}" "${use_trt}")" \
                            "$(func_set_params "${precision_key}" "${precision}")" \
                            "${set_model}" \
                            "$(func_set_params "${batch_size_key}" "${batch_size}")" \
                            "${set_input}" "${set_benchmark}" "${set_key1}" \
                            "$(func_infer_save "${run_tag}")")
                        func_run_logged "${cmd}" "${LOG_PATH}/${run_tag}.log" gpu
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
                            run_tag="python_infer_cpu_${tag}_usemkldnn_${use_mkldnn}_threads_${threads}_precision_${precision}_batchsize_${batch_size}"
                            cmd=$(func_join "${python}" "${script}" \
                                "$(func_set_params "${use_gpu_key}" "${use_gpu}")" \
                                "$(func_set_params "${use_mkldnn_key}" "${use_mkldnn}")" \
                                "$(func_set_params "${cpu_threads_key}" "${threads}")" \
                                "${set_model}" \
                                "$(func_set_params "${batch_size_key}" "${batch_size}")" \
                                "$(func_infer_save "${run_tag}")" \
                                "${set_input}" "${set_benchmark}" \
                                "$(func_set_params "${precision_key}" "${precision}")" "${set_key1}")
                            func_run_logged "${cmd}" "${LOG_PATH}/${run_tag}.log" cpu
                        done
                    done
                done
            done
        fi
    done
}

# func_infer_save RUN_TAG -> the inference output argument, LOG_PATH/<line 49 value>/RUN_TAG, so that
# every run's pictures stay under the log folder (the standard driver passes no value here; the
# script then writes to its default folder).
func_infer_save() {
    if func_is_null "${save_log_value}"; then
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

# func_export ENV_PREFIX SCRIPT WEIGHTS SAVE_DIR LOG DEVICE -> status of the export command.
func_export() {
    local cmd
    cmd=$(func_join "$1" "${python}" "$2" \
        "$(func_set_params "${export_weight_key}" "$3")" \
        "$(func_set_params "${save_infer_key}" "$4")")
    func_run_logged "${cmd}" "$5" "$6"
}

# func_skip_inference REASON TAG: record the inference commands that cannot run.
func_skip_inference() {
    status_skip "$1" "${python} ${inference_py} (every $2 combination)" "${status_log}"
}

if [[ ${MODE} == whole_infer ]]; then
    # No training: for each infer_model, export it in place with its infer_export command (null:
    # infer_model is already an exported folder), then run inference on line 48's images.
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
        if ! func_is_null "${export_py}" && ! func_export "" "${export_py}" "${infer_model}" \
            "${infer_model}" "${LOG_PATH}/export_${idx}.log" cpu; then
            func_skip_inference "export failed" "model ${idx}"
            continue
        fi
        func_inference "${inference_py}" "${infer_model}" "${infer_img_dir}" "${is_quant}" \
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
        set_device=$(func_set_params "${train_device_key}" "${device}")
        for autocast in "${autocasts[@]}"; do
            for trainer in "${trainers[@]}"; do
                is_quant=False
                case ${trainer} in
                    "${pact_key}") train_py=${pact_train}; export_py=${pact_export}; is_quant=True ;;
                    "${fpgm_key}") train_py=${fpgm_train}; export_py=${fpgm_export} ;;
                    "${distill_key}") train_py=${distill_train}; export_py=${distill_export} ;;
                    "${trainer_key1}") train_py=${trainer_value1}; export_py=${export_value1} ;;
                    "${trainer_key2}") train_py=${trainer_value2}; export_py=${export_value2} ;;
                    *) train_py=${norm_train}; export_py=${norm_export} ;;
                esac
                if func_is_null "${train_py}"; then
                    printf 'trainer %s: null in the config, skipped\n' "${trainer}"
                    continue
                fi
                tag="${trainer}_gpus_${gpu}_autocast_${autocast}"
                save_log="${LOG_PATH}/${tag}"
                train_log="${save_log}.log"
                cmd=$(func_join "${env_prefix}" "${python}" "${launcher}" "${train_py}" \
                    "${set_device}" \
                    "$(func_set_params "${save_model_key}" "${save_log}")" \
                    "$(func_set_params "${epoch_key}" "${epoch_value}")" \
                    "$(func_set_params "${pretrain_key}" "${pretrain_value}")" \
                    "$(func_set_params "${autocast_key}" "${autocast}")" \
                    "$(func_set_params "${train_batch_key}" "${train_batch_value}")" \
                    "$(func_set_params "${train_key1}" "${train_value1}")")
                if [[ ${device_kind} == gpu && ${has_cuda} != True ]]; then
                    status_skip "${no_cuda_reason}; its eval, export and inference too" \
                        "${cmd} > ${train_log} 2>&1" "${status_log}"
                    continue
                fi
                if ! func_run_logged "${cmd}" "${train_log}" "${device_kind}"; then
                    func_skip_inference "training failed" "${tag}"
                    continue
                fi
                # the trained model, as the standard driver names it: <save_log>/<train_model_name>
                trained="${save_log}/${train_model_name}"
                if ! func_is_null "${eval_py}"; then
                    cmd=$(func_join "${env_prefix}" "${python}" "${eval_py}" \
                        "$(func_set_params "${pretrain_key}" "${trained}")" "${set_device}" \
                        "$(func_set_params "${eval_key1}" "${eval_value1}")")
                    func_run_logged "${cmd}" "${save_log}_eval.log" "${device_kind}"
                fi
                if func_is_null "${export_py}"; then
                    printf '%s: export is null in the config; inference skipped\n' "${trainer}"
                    continue
                fi
                if ! func_export "${env_prefix}" "${export_py}" "${trained}" "${save_log}" \
                    "${save_log}_export.log" "${device_kind}"; then
                    func_skip_inference "export failed" "${tag}"
                    continue
                fi
                model_dir=${save_log}
                func_is_null "${inference_dir}" || model_dir="${save_log}/${inference_dir}"
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
