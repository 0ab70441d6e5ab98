#!/usr/bin/env python3
"""Runs a command and reports its peak resident memory, split into anonymous memory (heap: dense
copies, activations, KV cache) and file-backed pages (the memory-mapped GGUF files), sampling
/proc/PID/status every 50 ms; VmHWM is the kernel's exact peak of the total.

    python tests/llamacpp/peak_rss.py [--files F...] -- omni run --model DIR ...
"""
import json
import os
import subprocess
import sys
import time

argv = sys.argv[1:]
files = []
if argv and argv[0] == "--files":
    argv = argv[1:]
    while argv and argv[0] != "--":
        files.append(argv.pop(0))
if argv and argv[0] == "--":
    argv = argv[1:]
p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
last = {}
while p.poll() is None:
    try:
        for line in open(f"/proc/{p.pid}/status"):
            k, _, v = line.partition(":")
            if k in peak:
                kb = int(v.split()[0])
                peak[k] = max(peak[k], kb)
                last[k] = kb
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    time.sleep(0.05)
out, err = p.communicate()
sizes = sum(os.path.getsize(f) for f in files)
res = {
    "exit": p.returncode,
    "peak_rss_bytes": peak["VmHWM"] * 1024,
    "peak_anon_bytes": peak["RssAnon"] * 1024,
    "peak_file_bytes": peak["RssFile"] * 1024,
    "file_bytes": sizes,
}
if sizes:
    res["peak_rss_over_files"] = res["peak_rss_bytes"] / sizes
sys.stderr.write(err.decode(errors="replace")[-2000:])
print(json.dumps(res))
print(out.decode(errors="replace")[-3000:])
