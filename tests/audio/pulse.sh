#!/usr/bin/env bash
# A private PulseAudio daemon with a virtual speaker and microphone, for the live-loop tests.
#
#   tests/audio/pulse.sh start DIR [echo]   start a daemon whose runtime dir is DIR; prints shell
#                                           exports (XDG_RUNTIME_DIR, PULSE_SERVER) on stdout
#   tests/audio/pulse.sh stop DIR           stop it (by the pid file in DIR/pulse/pid)
#
# Devices:
#   spk            null sink: the app's speaker; spk.monitor records what it played
#   mic            pipe source fed from DIR/mic.fifo (s16le, 16 kHz, mono): write speech there
#   with "echo":   a speakerphone. micmix (null sink) mixes the user's voice (mic, through a loopback)
#                  and the speaker's output (spk.monitor, through a second loopback: the acoustic
#                  echo path, ~attenuated by volume 50%); the app records micmix.monitor.
#
# Readiness is polled (pactl info), never assumed; a daemon that cannot start is an error (exit 1),
# so tests using this script fail instead of skipping.
set -euo pipefail

cmd=${1:?usage: pulse.sh start|stop DIR [echo]}
dir=${2:?runtime dir}
mkdir -p "$dir"
export XDG_RUNTIME_DIR="$dir"
export PULSE_SERVER="unix:$dir/pulse/native"
# Root's default client config may point elsewhere; keep everything inside DIR.
export PULSE_CLIENTCONFIG=/dev/null HOME="$dir"

case "$cmd" in
start)
    command -v pulseaudio >/dev/null || { echo "pulse.sh: pulseaudio is not installed (apt-get install pulseaudio pulseaudio-utils)" >&2; exit 1; }
    # The socket lives in the private DIR, so any client may use it: no cookie check (a client that
    # read another daemon's cookie from the real HOME was refused with AccessDenied now and then).
    # module-pipe-source makes the FIFO itself (and keeps it open, so writers may come and go).
    rm -f "$dir/mic.fifo"
    pulseaudio --daemonize=yes --exit-idle-time=-1 --disallow-exit -n --use-pid-file=yes \
        --log-target=file:"$dir/pulse.log" \
        --load="module-native-protocol-unix auth-anonymous=1" \
        --load="module-null-sink sink_name=spk rate=48000 channels=2" \
        --load="module-pipe-source source_name=mic file=$dir/mic.fifo format=s16le rate=16000 channels=1" \
        >/dev/null 2>&1 || { echo "pulse.sh: pulseaudio did not start; log:" >&2; cat "$dir/pulse.log" >&2 2>/dev/null || true; exit 1; }
    ok=
    for _ in $(seq 1 100); do
        if pactl info >/dev/null 2>&1 && pactl list short sources 2>/dev/null | grep -q '\bmic\b'; then ok=1; break; fi
        sleep 0.1
    done
    [ -n "$ok" ] || { echo "pulse.sh: the daemon did not become ready in 10 s; log:" >&2; cat "$dir/pulse.log" >&2 2>/dev/null || true; exit 1; }
    pactl set-default-sink spk >/dev/null
    if [ "${3:-}" = echo ]; then
        pactl load-module module-null-sink sink_name=micmix rate=16000 channels=1 >/dev/null
        pactl load-module module-loopback source=mic sink=micmix latency_msec=20 >/dev/null
        pactl load-module module-loopback source=spk.monitor sink=micmix latency_msec=20 sink_input_properties=media.name=echo-path >/dev/null
        # The echo path: half amplitude (-6 dB), a room-ish acoustic coupling on a speakerphone.
        idx=$(pactl list short sink-inputs | awk '/module-loopback/ {print $1}' | tail -1)
        pactl set-sink-input-volume "$idx" 50% >/dev/null || true
        pactl set-default-source micmix.monitor >/dev/null
    else
        pactl set-default-source mic >/dev/null
    fi
    echo "export XDG_RUNTIME_DIR='$dir' PULSE_SERVER='unix:$dir/pulse/native' PULSE_CLIENTCONFIG=/dev/null"
    ;;
stop)
    pid=$(cat "$dir/pulse/pid" 2>/dev/null || true)
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    ;;
*)
    echo "usage: pulse.sh start|stop DIR [echo]" >&2; exit 2 ;;
esac
