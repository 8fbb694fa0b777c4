# Shared by make e2e (run.sh) and make fleet (tests/fleet/run.sh): sourced, not run.
#
#   stage [TITLE]                    end the current stage (its seconds), start the next
#   boot ROOT NAME LOG [NSPAWN_ARG]  boot ROOT under systemd-nspawn in the background; sets
#                                    booted_pid (nspawn) and booted_leader (the container's
#                                    systemd) once its manager answers; returns non-zero (LOG
#                                    shown) if it did not come up
#   system_state LEADER              `systemctl is-system-running --wait` inside (at most 180 s)
#   inside LEADER COMMAND...         run COMMAND in every namespace of LEADER, with a clean environment
#   build_deb                        make deb; sets deb (the package's path)

stage_start=0
stage() {
    [ "$stage_start" = 0 ] || printf '   (%d s)\n' $(($(date +%s) - stage_start))
    stage_start=$(date +%s)
    [ $# = 0 ] || printf '\n== %s\n' "$*"
}

boot() {
    local root=$1 name=$2 log=$3
    shift 3
    systemd-nspawn -b -D "$root" --register=no --keep-unit --console=passive -M "$name" "$@" >"$log" 2>&1 &
    booted_pid=$!
    booted_leader=
    for _ in $(seq 200); do
        booted_leader=$(pgrep -P "$booted_pid" -x systemd || true)
        [ -z "$booted_leader" ] || break
        sleep 0.1
    done
    [ -n "$booted_leader" ] || { cat "$log"; echo "the container $name did not start"; return 1; }
    # Asked before the container's manager has its private socket, systemctl fails at once with
    # "Failed to connect to bus" (on a slower machine, every time): wait for the socket first.
    for _ in $(seq 1200); do
        [ -S "/proc/$booted_leader/root/run/systemd/private" ] && break
        kill -0 "$booted_leader" 2>/dev/null || break
        sleep 0.1
    done
    [ -S "/proc/$booted_leader/root/run/systemd/private" ] || { cat "$log"; echo "$name: no systemd manager socket"; return 1; }
}

system_state() {
    timeout 180 nsenter -t "$1" -a systemctl is-system-running --wait || true
}

inside() {
    local leader=$1
    shift
    nsenter -t "$leader" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"
}

build_deb() {
    make -s -C "$repo" deb | tail -3
    deb=$(ls -t "$repo"/dist/sandboxd_*_"$(dpkg --print-architecture)".deb | head -1)
    echo "   $deb"
}
