"""What the profiling scripts share: per-step CUDA kernel totals and GPU idle gaps from torch.profiler."""
import torch


def cuda_kernels(prof, steps):
    """The CUDA events of a profile, longest total first, as ``(calls per step, mean us, us per step,
    name)``; and the summed time per step (us)."""
    evs = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA and e.count > 0]
    evs.sort(key=lambda e: -e.device_time_total)
    rows = [(e.count / steps, e.device_time_total / e.count, e.device_time_total / steps, e.key) for e in evs]
    return rows, sum(r[2] for r in rows)


def gpu_gaps(prof, steps, top=20):
    """Where the GPU waits: the union of kernel intervals against the profiled window, and the
    longest idle gaps with the kernels on either side (a gap after a short kernel = launch-bound)."""
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not ks:
        return ""
    busy, gaps, cur_s, cur_e, prev = 0.0, [], ks[0][0], ks[0][1], ks[0][2]
    for s, e, n in ks[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, prev, n))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
        prev = n if e >= cur_e else prev
    busy += cur_e - cur_s
    window = ks[-1][1] - ks[0][0]
    gaps.sort(reverse=True)
    lines = [f"GPU busy {busy / 1e3 / steps:.1f} ms of {window / 1e3 / steps:.1f} ms per step "
             f"(idle {(window - busy) / 1e3 / steps:.1f} ms/step in {len(gaps)} gaps; "
             f"{sum(g for g, _, _ in gaps if g < 20) / 1e3 / steps:.2f} ms/step in gaps under 20 us)",
             f"{'gap us':>8s}  after -> before"]
    lines += [f"{g:8.1f}  {a_[:60]} -> {b_[:60]}" for g, a_, b_ in gaps[:top]]
    return "\n".join(lines) + "\n"
