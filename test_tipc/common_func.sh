#!/usr/bin/env bash
# Helpers shared by test_tipc/prepare.sh and test_tipc/test_train_inference_python.sh.
#
# Source it; it defines functions only (no side effects, no `set` options):
#
#   source test_tipc/common_func.sh
#
# A config line is "key:value", split on the FIRST ':' (values may hold ':' themselves).
# The word null, as a key or as a value, means "drop this argument" or "skip this stage".
# A value may select by mode: "lite_train_lite_infer=64|whole_train_whole_infer=256".
# Line-level helpers print their result on stdout; nothing here exits the calling shell.

TIPC_MODES=(lite_train_lite_infer lite_train_whole_infer whole_infer whole_train_whole_infer)

# func_parser_key "key:value" -> key (the text before the first ':'; the whole line without ':').
func_parser_key() {
    local line=$1
    printf '%s\n' "${line%%:*}"
}

# func_parser_value "key:value" -> value (everything after the first ':'; empty without ':').
func_parser_value() {
    local line=$1
    if [[ ${line} == *:* ]]; then
        printf '%s\n' "${line#*:}"
    else
        printf '\n'
    fi
}

# func_parser_params "key:MODE1=v1|MODE2=v2|default" MODE -> the value for MODE.
# Entries are separated by '|'. "MODE=value" applies to that mode only; an entry without '='
# applies to every mode not listed. A mode that matches nothing gives null (argument dropped).
# A value without any "MODE=" entry is returned as it is (e.g. "True|False", looped over later).
func_parser_params() {
    local line=$1 mode=$2 value entry fallback=null selected=""
    value=$(func_parser_value "${line}")
    if ! func_is_mode_value "${value}"; then
        printf '%s\n' "${value}"
        return 0
    fi
    local -a entries
    IFS='|' read -r -a entries <<< "${value}"
    for entry in "${entries[@]}"; do
        if [[ ${entry} == *=* ]]; then
            if [[ ${entry%%=*} == "${mode}" && -z ${selected} ]]; then
                selected=${entry#*=}
                [[ -n ${selected} ]] || selected=null
            fi
        else
            fallback=${entry}
        fi
    done
    printf '%s\n' "${selected:-${fallback}}"
}

# func_is_mode_value VALUE: true when VALUE selects by mode (some '|' entry starts with "MODE=").
func_is_mode_value() {
    local value=$1 entry mode
    local -a entries
    IFS='|' read -r -a entries <<< "${value}"
    for entry in "${entries[@]}"; do
        for mode in "${TIPC_MODES[@]}"; do
            [[ ${entry} == "${mode}="* ]] && return 0
        done
    done
    return 1
}

# func_is_mode MODE: true for one of the four TIPC modes.
func_is_mode() {
    local mode
    for mode in "${TIPC_MODES[@]}"; do
        [[ $1 == "${mode}" ]] && return 0
    done
    return 1
}

# func_is_null VALUE: true for null, an empty string or blanks only.
func_is_null() {
    local value=${1//[[:space:]]/}
    [[ -z ${value} || ${value} == null ]]
}

# func_set_params KEY VALUE -> "KEY=VALUE" (the form Paddle's TIPC drivers pass), or nothing when
# KEY or VALUE is null or empty.
func_set_params() {
    local key=$1 value=$2
    if func_is_null "${key}" || func_is_null "${value}"; then
        printf '\n'
    else
        printf '%s=%s\n' "${key}" "${value}"
    fi
}

# func_split_list VALUE ARRAY_NAME: split a "a|b|c" value into the named array.
func_split_list() {
    local -n _tipc_out=$2
    _tipc_out=()
    IFS='|' read -r -a _tipc_out <<< "$1"
    [[ ${#_tipc_out[@]} -gt 0 ]] || _tipc_out=(null)
}

# func_read_config FILE ARRAY_NAME: the config's lines (CR and trailing blanks removed) into the
# named array; element i is line i+1 of the file.
func_read_config() {
    local file=$1 line
    local -n _tipc_lines=$2
    _tipc_lines=()
    while IFS= read -r line || [[ -n ${line} ]]; do
        line=${line%$'\r'}
        line=${line%"${line##*[![:space:]]}"}
        _tipc_lines+=("${line}")
    done < "${file}"
}

# TIPC_LINES: the lines of the standard layout (Paddle's generic driver reads the first 51).
TIPC_LINES=51

# func_check_layout ARRAY_NAME FILE: print why the loaded config is not in the standard layout
# (fewer than 51 lines, an empty line among them, a section header elsewhere than on lines 1, 23
# and 27) and return 1; return 0 when it is. Empty lines matter: the standard driver drops them,
# which moves every later line up.
func_check_layout() {
    local -n _tipc_cfg=$1
    local file=$2 i
    if [[ ${#_tipc_cfg[@]} -lt ${TIPC_LINES} ]]; then
        printf '%s: %s lines, the standard layout has %s\n' "${file}" "${#_tipc_cfg[@]}" "${TIPC_LINES}"
        return 1
    fi
    for ((i = 0; i < TIPC_LINES; i++)); do
        if [[ -z ${_tipc_cfg[i]//[[:space:]]/} ]]; then
            printf '%s: line %s is empty; every line of the layout holds key:value or ##\n' \
                "${file}" "$((i + 1))"
            return 1
        fi
    done
    if [[ ${_tipc_cfg[0]} != *train_params* || ${_tipc_cfg[22]} != *eval_params* \
        || ${_tipc_cfg[26]} != *infer_params* ]]; then
        printf '%s: section headers must be on lines 1, 23 and 27\n' "${file}"
        return 1
    fi
}

# key N / value N / mode_value N: the key, the value, the value for MODE of line N+1 of the config
# that func_read_config loaded into the array `lines` (N is the array index, as in the standard
# driver); they read the globals lines and MODE.
# shellcheck disable=SC2154  # lines is the caller's array
key() { func_parser_key "${lines[$1]}"; }
# shellcheck disable=SC2154  # lines is the caller's array
value() { func_parser_value "${lines[$1]}"; }
# shellcheck disable=SC2154,SC2153  # lines and MODE are the caller's
mode_value() { func_parser_params "${lines[$1]}" "${MODE}"; }

# TIPC_LINE_MAP: the standard layout as the standard driver reads it, one "INDEX KEY_VAR VALUE_VAR"
# entry per line it reads (INDEX = line number - 1): KEY_VAR gets the line's key, VALUE_VAR its
# value, or its value for MODE when VALUE_VAR ends in '*' (the epoch and batch lines); - = not read.
TIPC_LINE_MAP=(
    "1 - model_name" "2 - python" "3 - gpu_list" "4 train_device_key train_device_list"
    "5 autocast_key autocast_list" "6 epoch_key epoch_value*" "7 save_model_key -"
    "8 train_batch_key train_batch_value*" "9 pretrain_key pretrain_value"
    "10 - train_model_name" "11 - train_infer_img_dir" "12 train_key1 train_value1"
    "14 - trainer_list" "15 - norm_train" "16 pact_key pact_train" "17 fpgm_key fpgm_train"
    "18 distill_key distill_train" "19 trainer_key1 trainer_value1"
    "20 trainer_key2 trainer_value2"
    "23 - eval_py" "24 eval_key1 eval_value1"
    "27 save_infer_key -" "28 export_weight_key -" "29 - norm_export" "30 - pact_export"
    "31 - fpgm_export" "32 - distill_export" "33 - export_value1" "34 - export_value2"
    "35 - inference_dir" "36 - infer_model_list" "37 - infer_export_list" "38 - infer_quant_list"
    "39 - inference_py" "40 use_gpu_key use_gpu_list" "41 use_mkldnn_key use_mkldnn_list"
    "42 cpu_threads_key cpu_threads_list" "43 batch_size_key batch_size_list"
    "44 use_trt_key use_trt_list" "45 precision_key precision_list" "46 infer_model_key -"
    "47 image_dir_key infer_img_dir" "48 save_log_key save_log_value"
    "49 benchmark_key benchmark_value" "50 infer_key1 infer_value1"
)

# func_parse_layout: set the global variables of TIPC_LINE_MAP from the config that
# func_read_config loaded into `lines` (check it with func_check_layout first; MODE must be set).
func_parse_layout() {
    local entry index key_var value_var
    for entry in "${TIPC_LINE_MAP[@]}"; do
        read -r index key_var value_var <<< "${entry}"
        [[ ${key_var} == - ]] || printf -v "${key_var}" '%s' "$(key "${index}")"
        if [[ ${value_var} == *'*' ]]; then
            printf -v "${value_var%'*'}" '%s' "$(mode_value "${index}")"
        elif [[ ${value_var} != - ]]; then
            printf -v "${value_var}" '%s' "$(value "${index}")"
        fi
    done
}

# func_has_cuda PYTHON -> True or False: whether this Paddle build has CUDA.
# TIPC_HAS_CUDA=True|False overrides the check (used by the tests).
func_has_cuda() {
    local python=${1:-python} answer
    if [[ -n ${TIPC_HAS_CUDA:-} ]]; then
        answer=${TIPC_HAS_CUDA}
    else
        answer=$("${python}" -c "import paddle; print(paddle.is_compiled_with_cuda())" 2>/dev/null \
            | tail -n 1)
    fi
    if [[ ${answer} == True ]]; then
        printf 'True\n'
    else
        printf 'False\n'
    fi
}

# func_run_cmd "COMMAND" LOG: run COMMAND (split on blanks, no globbing, no shell syntax) with its
# stdout and stderr going to LOG; returns the command's exit status.
func_run_cmd() {
    local -a argv
    read -r -a argv <<< "$1"
    if [[ ${#argv[@]} -eq 0 ]]; then
        printf 'empty command\n' > "$2"
        return 127
    fi
    "${argv[@]}" > "$2" 2>&1
}

# status_check STATUS "COMMAND" RESULTS_LOG [RUN_LOG]: append the result line to RESULTS_LOG
# ("Run successfully with command - COMMAND!" or "Run failed with command - COMMAND!") and echo it;
# after a failure, also print the end of RUN_LOG.
status_check() {
    local status=$1 command=$2 results_log=$3 run_log=${4:-}
    local line
    if [[ ${status} -eq 0 ]]; then
        line="Run successfully with command - ${command}!"
    else
        line="Run failed with command - ${command}!"
    fi
    printf '%s\n' "${line}" >> "${results_log}"
    printf '%s\n' "${line}"
    if [[ ${status} -ne 0 && -n ${run_log} && -f ${run_log} ]]; then
        printf -- '--- last lines of %s ---\n' "${run_log}"
        tail -n 20 "${run_log}"
        printf -- '---\n'
    fi
}

# status_skip "REASON" "COMMAND" RESULTS_LOG: record a command that was not run.
status_skip() {
    local line="Skipped (${1}) with command - ${2}!"
    printf '%s\n' "${line}" >> "$3"
    printf '%s\n' "${line}"
}

# func_join WORD... -> the non-blank words joined by single spaces (builds command lines from
# func_set_params results, some of which are empty).
func_join() {
    local word out=""
    for word in "$@"; do
        [[ -n ${word//[[:space:]]/} ]] && out+="${out:+ }${word}"
    done
    printf '%s\n' "${out}"
}
