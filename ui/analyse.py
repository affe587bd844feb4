"""A classifier's CAR analysis, the Analyse page of the classification task (``ui.classification.analysis_panel``):
CAR of every filter (background job), per-layer sensitivity, heat map, filter gallery, per-class CAR."""
from __future__ import annotations

import streamlit as st

from core import visualize as V
from core.car import CAR_METHODS
from core.errors import PruneScopeError
from core.jobs import JobAlreadyRunning, car_job
from core.prune import PruneConfig
from ui.charts import to_image
from ui.common import action_button, format_pct, format_seconds, job_status, page_link
from ui.state import AppState, get_registry, model_lock, private_copy
from ui.workers import where_caption, work_picker

# the Prune page's default scoring images: with both defaults a prune reuses the analysis (same images)
ANALYSIS_IMAGES = PruneConfig.app_defaults().score_images


def car_analysis(state: AppState) -> None:
    """The settings box and the job's progress, then the finished analysis in five tabs and the way to Prune."""
    CarAnalysis(state).show()


@st.cache_resource(max_entries=12, show_spinner="Drawing filters and finding their top-activating patches...")
def cached_gallery(cache_key: tuple, layer: str, sort: str, limit: int, descending: bool, _model, _spec, _images,
                   _scores) -> list[dict]:
    with model_lock(_model):
        return V.gallery(_model, _spec, _images, layer, _scores, sort=sort, limit=limit, k=4, size=64,
                         descending=descending)


class CarAnalysis:
    """The analysis of the session's classifier: its model, images and CAR job (keyed by the working set's key)."""

    def __init__(self, state: AppState):
        self.state, self.registry, self.key = state, get_registry(), state.key
        self.model, self.spec, self.data = state.model.model, state.model.spec.input, state.data
        self.running = False
        self.groups: dict = {}
        self.gids: list = []

    def show(self) -> None:
        """What the page shows, top to bottom."""
        self.running = self.attach_car_job()
        self.analysis_settings()
        registry, key, running = self.registry, self.key, self.running

        @st.fragment(run_every=1.0 if running else None)
        def car_status() -> None:
            job_status(registry, "car", key, "CAR analysis", running, what="CAR analysis")

        car_status()
        car = self.finished_car()
        self.groups = self.car_summary(car)
        self.gids = list(self.groups)
        tab_layer, tab_heat, tab_sens, tab_gallery, tab_class = st.tabs(
            ["CAR per layer", "Heat map", "Sensitivity", "Filter gallery", "Per-class CAR"])
        with tab_layer:
            self.car_per_layer(car)
        with tab_heat:
            self.heat_map(car)
        with tab_sens:
            self.layer_sensitivity(car)
        with tab_gallery:
            self.filter_gallery(car)
        with tab_class:
            self.per_class_car(car)
        st.markdown("**Next**")
        page_link("prune", "Prune with these scores in mind")

    def attach_car_job(self) -> bool:
        """Re-attach to this model's CAR job (it lives in the app-wide registry, so a reload finds it); a finished
        job's result becomes the page's CAR. Returns whether the job is still running."""
        job = self.registry.latest("car", self.key)
        if job is not None:
            snap = job.snapshot()
            if snap.state == "done" and self.state.car is None:
                self.state.car = snap.result
        return job is not None and job.running

    def start_car(self, n_images: int, sensitivity: bool, method: str, work=None) -> None:
        model_copy = private_copy(self.state.model).model
        try:  # the result carries its fingerprint (model state, images): a prune that matches it reuses it
            self.registry.start("car", car_job(model_copy, self.spec, self.data.val, n_images=n_images,
                                               sensitivity=sensitivity, method=method, work=work),
                                key=self.key, meta={"n_images": n_images, "sensitivity": sensitivity, "method": method,
                                                    **({"where": work.to_dict()} if work is not None else {})})
            self.state.car = None
        except JobAlreadyRunning:
            pass  # the running job is shown below

    def cancel_car(self) -> None:
        j = self.registry.latest("car", self.key)
        if j is not None:
            j.request_cancel()

    def analysis_settings(self) -> None:
        """The settings box: selection images, sensitivity, method, where the work runs, and Compute / Cancel."""
        with st.container(border=True):
            c1, c2, c3, c4 = st.columns([2, 1, 1, 1], vertical_alignment="bottom")
            n_max = len(self.data.val)
            if n_max > 50:
                n_images = c1.slider("Selection images used", 50, n_max, min(ANALYSIS_IMAGES, n_max), step=10,
                                     key="car_images",
                                     help="More images give finer CAR scores (one image = 1/N accuracy) and take "
                                          f"longer. A prune scoring on as many images ({ANALYSIS_IMAGES} by default) "
                                          "reuses this analysis instead of computing it again.")
            else:
                n_images = n_max
                c1.markdown(f"All **{n_max}** selection images are used (a larger data set gives finer CAR "
                            "scores).")
            sensitivity = c2.toggle("Per-layer sensitivity", value=True, key="car_sensitivity",
                                    help="Accuracy with the lowest-CAR 10 %..90 % of one layer removed, per layer.")
            method = c3.radio("Method", list(CAR_METHODS), index=list(CAR_METHODS).index("exact"), key="car_method",
                              horizontal=True, help="exact: every filter removed and measured. fast: a first-order "
                                                    "screen of every filter, exact CAR only for the lowest-screened "
                                                    "shortlist (the filters pruning would take); the rest are "
                                                    "labelled screened.")
            work, work_ok = work_picker("car", self.running)
            if self.running:
                c4.button("Cancel", key="car_cancel", on_click=self.cancel_car, icon=":material/stop:",
                          width="stretch")
            else:
                action_button(c4, "Compute CAR" if self.state.car is None else "Recompute CAR", self.start_car,
                              n_images, sensitivity, method, None if work.where == "local" else work, key="car_start",
                              type="primary", icon=":material/play_arrow:", width="stretch", disabled=not work_ok)

    def finished_car(self):
        """The CAR result to show; without one the page ends here (with a hint when no job is running)."""
        if self.state.car is None:
            if not self.running:
                st.info("Press **Compute CAR** to score every filter. It runs in the background with live progress: "
                        "you can look at other pages meanwhile, and a reloaded tab finds it again.",
                        icon=":material/info:")
            st.stop()
        return self.state.car

    def car_summary(self, car) -> dict:
        """The result's headline (filters, layers, images, exactness, time, where it ran) and the layers pruning
        will leave alone; returns the analysed groups by id (the tabs' layer choices)."""
        n_filters = sum(len(v) for v in car.car.values())
        exactness = ("every filter exact (measured)" if car.n_exact == n_filters else
                     f"{car.n_exact} exact (measured), {n_filters - car.n_exact} screened (first-order estimate)")
        st.success(f"CAR of {n_filters} filters in {len(car.groups)} layers, on {car.n_images} images "
                   f"(baseline {format_pct(car.baseline_accuracy)}; {car.mode}; {exactness}; "
                   f"{format_seconds(car.seconds)}).", icon=":material/check_circle:")
        if where_caption(getattr(car, "where", None)):
            st.caption(where_caption(car.where))
        left_alone = (getattr(car, "left_alone", None)
                      or {g["root"]: g["left_alone"] for g in car.groups if g.get("left_alone")})
        if left_alone:  # every layer pruning will not touch, with why (issue 13 item 8)
            with st.expander(f"{len(left_alone)} layer(s) will be left alone by pruning", icon=":material/block:"):
                st.markdown("\n".join(f"- **{root}**: {why}" for root, why in left_alone.items()))
        return {int(g["gid"]): g for g in car.groups}

    def label(self, gid: int) -> str:
        g = self.groups[gid]
        return f"{V.group_label(g)} · {g['width']} filters"

    def car_per_layer(self, car) -> None:
        """One layer's CAR per filter as bars (and, for exact results, as a table)."""
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        gid = c1.selectbox("Layer", self.gids, format_func=self.label, key="an_layer")
        sort = c2.toggle("Lowest CAR first", value=True, key="an_layer_sort")
        st.plotly_chart(V.fig_car_per_filter(car, gid, sort=sort), key="an_fig_layer")
        st.caption("One bar per filter: accuracy points lost when that filter alone is removed. Filters at or below "
                   "zero can go at no cost on these images; pruning removes the lowest first.")
        if car.exact:
            st.dataframe([{"filter": f, "CAR (points)": round(v * 100, 3),
                           "figure": "exact" if car.is_exact(gid, f) else "screened"}
                          for f, v in sorted(enumerate(car.car[gid]), key=lambda t: t[1])],
                         hide_index=True, width="stretch", key="an_exact_table")

    def heat_map(self, car) -> None:
        """Every layer's CAR as one heat map, columns by CAR rank or channel index."""
        by = st.radio("Columns", ["rank", "index"], horizontal=True, key="an_heat_by",
                      format_func=lambda b: "sorted by CAR within each layer" if b == "rank" else "channel index")
        st.plotly_chart(V.fig_car_heatmap(car, by=by), key="an_fig_heat")

    def layer_sensitivity(self, car) -> None:
        """Accuracy as the lowest-CAR share of each chosen layer is removed (when it was computed)."""
        if not car.sensitivity:
            st.info("Sensitivity was not computed: switch on **Per-layer sensitivity** and recompute.")
            return
        chosen = st.multiselect("Layers", self.gids, default=self.gids[: min(len(self.gids), 8)],
                                format_func=self.label, key="an_sens")
        if chosen:
            st.plotly_chart(V.fig_sensitivity(car, chosen), key="an_fig_sens")
            st.caption("Each line removes the lowest-CAR share of one layer's filters (that layer only, no "
                       "fine-tuning). Layers whose line stays flat are where pruning is cheap.")
        else:
            st.info("Choose at least one layer.")

    def conv_layers(self) -> list[tuple[int, str]]:
        """(group, producer) for every producer conv of every analysed group: the layers with filter images."""
        return V.gallery_layers(self.model, [self.groups[gid] for gid in self.gids])

    def filter_gallery(self, car) -> None:
        """Filter cards of one conv layer: weights, activation map on a chosen image, top-activating patches."""
        layers = self.conv_layers()
        if not layers:
            st.info("This model has no convolution whose filters can be drawn.")
            return
        c1, c2, c3 = st.columns([2, 1, 1])
        gl = c1.selectbox("Layer", layers, format_func=lambda t: f"{t[1]} ({self.groups[t[0]]['width']} filters)",
                          key="an_gal_layer")
        order = c2.selectbox("Order", ["lowest CAR first", "highest CAR first", "channel index"], key="an_gal_order")
        width_gl = self.groups[gl[0]]["width"]
        limit = (c3.slider("Filters shown", 4, min(64, width_gl), min(12, width_gl), step=4, key="an_gal_limit")
                 if width_gl > 4 else width_gl)
        image_index = self.gallery_image()
        try:
            entries = cached_gallery((self.key, car.n_images, car.seconds), gl[1],
                                     "index" if order == "channel index" else "car", limit,
                                     order == "highest CAR first", self.model, self.spec, self.data.val.images[:256],
                                     car.car[gl[0]])
        except PruneScopeError as exc:
            st.error(str(exc))
            entries = []
        st.caption(V.gallery_caption(entries, k=4))
        self.filter_cards(car, gl, entries, image_index)

    def gallery_image(self) -> int:
        """The selection image (chosen by class, then by number within it) whose activation maps the cards show."""
        names = list(self.data.class_names)
        c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="center")
        cls = c1.selectbox("Image for the activation maps: class", range(len(names)), format_func=lambda i: names[i],
                           key="an_gal_class")
        members = (self.data.val.labels == cls).nonzero().flatten().tolist()
        pick = (c2.slider("Image of that class", 1, max(1, len(members)), 1, key="an_gal_image")
                if len(members) > 1 else 1)
        image_index = members[pick - 1] if members else 0
        c3.image(to_image(self.data.val.images[image_index]), caption="chosen image", width=96)
        return image_index

    def filter_cards(self, car, gl: tuple[int, str], entries: list[dict], image_index: int, per_row: int = 4) -> None:
        """The gallery's cards, ``per_row`` to a row."""
        for row in range(0, len(entries), per_row):
            cols = st.columns(per_row)
            for col, e in zip(cols, entries[row:row + per_row]):
                with col.container(border=True):
                    st.markdown(V.filter_card_title(e) + ("" if car.is_exact(gl[0], e["index"]) else " (screened)"))
                    a, m = st.columns(2)
                    a.image(e["weight"], caption="weights", width=64)
                    with model_lock(self.model):
                        heat = V.activation_map(self.model, gl[1], self.data.val.images[image_index], self.spec,
                                                e["index"], size=64)
                    m.image(heat, caption="activation", width=64)
                    if e["patches"]:
                        st.image(e["patches"], width=40)
                        st.caption("top-activating patches")

    def per_class_car(self, car) -> None:
        """One class's CAR per filter of one layer, against the overall CAR."""
        if not car.per_class:
            st.info("Per-class CAR was not computed for this result.")
            return
        c1, c2 = st.columns(2)
        names = list(car.class_names)
        ci = c1.selectbox("Class", range(len(names)), format_func=lambda i: names[i], key="an_pc_class")
        gid_pc = c2.selectbox("Layer", self.gids, format_func=self.label, key="an_pc_layer")
        st.plotly_chart(V.fig_per_class_car(car, gid_pc, ci), key="an_fig_class")
        st.caption(f"Bars: how much the accuracy on '{names[ci]}' falls when each filter is removed; diamonds: the "
                   "overall CAR. A filter with a small overall CAR can still matter for one class.")
