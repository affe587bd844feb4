"""The words PruneScope uses, one definition each, for every page, the CLI's help and the README.

Issue 27: "validation", "selection" and "test" meant different things on different pages ("1000 validation
images" for the selection images, "selection 20 %" for half of a ``val/`` folder), and CAR was called
"measured exactly" where the default was the fast screen. A page, a CLI help text or a README line that
names one of these things takes its word and definition from here; ``tests/app/test_app_glossary.py``
checks the pages, ``tests/unit/test_glossary.py`` the README and the CLI.
"""
from __future__ import annotations

# term -> definition (one sentence, no trailing full stop), in reading order
TERMS: dict[str, str] = {
    "train images": "the images that fine-tune the model after each removal, in recoveries and in the control; "
                    "no decision reads their accuracy",
    "selection images": "the images that score filters (CAR), choose each step's clusters and decide whether a step "
                        "stays within the acceptable drop: 20 % of a data set without train/ and val/ folders "
                        "(the Load page's selection share), else half of its val/ folder",
    "test images": "images no decision ever reads: the figure reported for the model that ships, with its 95 % "
                   "interval; 20 % of a data set without train/ and val/ folders, else the other half of val/ "
                   "(or its test/ folder)",
    "CAR": "Classification Accuracy Reduction: the selection accuracy lost when one filter is removed",
    "exact CAR": "CAR measured by removing the filter and evaluating the selection images, for every filter",
    "screened CAR": "a first-order estimate of CAR from gradients (the fast method, the default); exact CAR is then "
                    "measured only for the shortlist that can decide a cluster, and every figure says which it is",
    "cluster": "filters removed together from one layer group, as many as the hardware's vector width (8 on the "
               "NCS2), so every layer keeps a width the hardware runs efficiently",
    "step": "one decision of a pruning run: clusters removed, a short fine-tuning, then the selection accuracy "
            "measured; kept when the drop stays within the acceptable drop, else undone",
    "acceptable drop": "how many accuracy points below the original a step may be on the selection images",
    "recovery": "a longer fine-tune (whole passes of the train images) that becomes a step of its own when no "
                "cluster fits the acceptable drop; the run goes on from it",
    "control": "the original model given the same fine-tuning and recoveries as the step the run ships, measured on "
               "the same images: how much of a step's figure is that training, not pruning",
}


def define(term: str) -> str:
    """The definition of ``term`` (a key of :data:`TERMS`); KeyError for a word the glossary lacks."""
    return TERMS[term]


def sentence(term: str) -> str:
    """``'Selection images: the images that ...'`` — the term capitalised with its definition, as one sentence."""
    return f"{term[0].upper()}{term[1:]}: {TERMS[term]}."


def markdown() -> str:
    """The whole glossary as a markdown list (the app's sidebar, the README)."""
    return "\n".join(f"- **{term}**: {TERMS[term]}." for term in TERMS)
