#!/bin/sh
# A process worker in POSIX sh (docs/workers.md, "Process workers"): it serves "Size", which
# answers how many bytes its job's line took. Any language that reads and prints lines will do.
printf '%s\n' '{"hello": "pypelinin worker", "protocol": 1, "workers": ["Size"]}'
while IFS= read -r line; do
    # The broker prints compact JSON: the id is the 32 hex digits after "job id":.
    id=$(printf '%s' "$line" | sed -n 's/.*"job id":"\([0-9a-f]*\)".*/\1/p')
    if [ -z "$id" ]; then
        echo "no job id in: $line" >&2
        exit 1
    fi
    bytes=$(printf '%s' "$line" | wc -c | tr -d ' ')
    case "$line" in
        *'"fail":true'*)
            printf '{"job id": "%s", "error": "asked to fail", "traceback": "size.sh: line %s"}\n' "$id" "$bytes" ;;
        *)
            printf '{"job id": "%s", "result": {"line bytes": %s}}\n' "$id" "$bytes" ;;
    esac
done
