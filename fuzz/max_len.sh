# Sourced by scripts/fuzz.sh and fuzz/long_run.sh: libFuzzer's -max_len per
# target. Big enough for the seeds and their growth, small enough that each
# run stays fast. part10_roundtrip repeats generated text, so a small input
# still reaches values past 64 KiB.
max_len() {
    case "$1" in
        pdu_stream) echo 65536 ;;
        dicom_file) echo 32768 ;;
        config) echo 16384 ;;
        npy) echo 4096 ;;
        part10_roundtrip) echo 8192 ;;
        *) echo 4096 ;;
    esac
}
