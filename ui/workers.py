"""The "where the heavy work runs" choice of the Analyse and Prune pages: this process, a local Ray cluster the
tool starts, or an existing Ray cluster by address (:mod:`core.distributed`), and a check that lists the
workers and their devices."""
from __future__ import annotations

import streamlit as st

from core.device import available_cores
from core.distributed import CarPool, WorkSetting, ray_available
from core.errors import PruneScopeError

CHOICES = ("this process", "local Ray cluster", "Ray cluster by address")
HELP = ("Where CAR's ablations run. **This process** is the default and the reference. A **local Ray cluster** is "
        "started for the job with this many workers and stopped after it. An **existing cluster** is reached by "
        "address: `auto` (the cluster this machine joined with `ray start`) or `ray://HOST:10001`. The workers "
        "give the very same CAR values; the record says where each part ran.")


def work_picker(prefix: str, running: bool) -> tuple[WorkSetting, bool]:
    """The setting, and whether it is usable (valid, and Ray imports when asked for). Inside an expander."""
    ok, why = ray_available()
    with st.expander("Where the heavy work runs", icon=":material/hub:"):
        choice = st.radio("CAR runs on", CHOICES, index=0, key=f"{prefix}_where", horizontal=True,
                          disabled=running or not ok, help=HELP)
        if not ok:
            st.caption(why)
            return WorkSetting(), True
        setting = WorkSetting()
        if choice == CHOICES[1]:
            n = st.number_input("Workers", 1, 64, min(2, available_cores()), key=f"{prefix}_ray_workers",
                                disabled=running, help=f"This machine has {available_cores()} core(s); more workers "
                                                       "than cores only share them.")
            setting = WorkSetting(workers=int(n))
        elif choice == CHOICES[2]:
            address = st.text_input("Ray address", "auto", key=f"{prefix}_ray_address", disabled=running,
                                    help="`auto` or `ray://HOST:10001` (the head's Ray Client port)")
            n = st.number_input("Workers (0 = one per CPU of the cluster)", 0, 1024, 0, key=f"{prefix}_ray_n",
                                disabled=running)
            setting = WorkSetting(address=address.strip() or None, workers=int(n) or None)
        try:
            setting.validate()
        except PruneScopeError as exc:
            st.error(str(exc), icon=":material/error:")
            return setting, False
        if setting.where != "local":
            if st.button("Check the workers", key=f"{prefix}_ray_check", disabled=running, icon=":material/lan:",
                         help="Starts (or reaches) the cluster, lists its workers and their devices, and stops "
                              "what it started."):
                with st.spinner(f"Reaching {setting.describe()}..."):
                    try:
                        with CarPool(setting) as pool:
                            st.session_state[f"{prefix}_ray_seen"] = (setting.to_dict(), pool.describe(),
                                                                      pool.record.workers)
                    except PruneScopeError as exc:
                        st.session_state[f"{prefix}_ray_seen"] = (setting.to_dict(), f"error: {exc}", [])
            seen = st.session_state.get(f"{prefix}_ray_seen")
            if seen and seen[0] == setting.to_dict():
                st.caption(seen[1])
                if seen[2]:
                    st.dataframe([{k: w[k] for k in ("worker", "host", "device", "pid")} for w in seen[2]],
                                 hide_index=True)
    return setting, True


def where_caption(where: dict | None) -> str | None:
    """One line for a result's ``where`` record (``core.car.CarResult.where``); None for this process."""
    if not where or where.get("where", "local") == "local":
        return None
    places = ", ".join(f"{k}: {v}" for k, v in sorted((where.get("ablations_by_place") or {}).items()))
    workers = where.get("workers") or []
    devices = sorted({w.get("device", "?") for w in workers})
    text = f"Scored on {len(workers)} Ray worker(s) ({'; '.join(devices)}); ablations by place: {places}."
    if where.get("events"):
        text += " " + " ".join(where["events"])
    return text


def recovery_toggle(prefix: str, running: bool, setting: WorkSetting) -> bool:
    """Whether the run's recoveries also go to the Ray workers (Ray Train, DDP; ``core.ray_recovery``); only
    offered when CAR runs on Ray."""
    if setting.where == "local":
        return False
    return st.toggle("Recoveries on the Ray workers too (Ray Train, DDP)", value=False, key=f"{prefix}_ray_recovery",
                     disabled=running, help="The same schedule, distillation and best-epoch rule as in this process; "
                                            "BatchNorm sees each worker's share of a batch, so the result matches the "
                                            "local recovery within its run-to-run spread, not value for value.")
