"""The UI -> API workflow converter on the graph features the shipped workflows do not all use.

The browser tier proves the converter equals the frontend's graphToPrompt on every shipped workflow; these
cases lock in the rest of what graphToPrompt does: Reroute and bypassed nodes are passed through, a
PrimitiveNode's value stays on its target widget, muted nodes and notes vanish, a seed's control value and an
upload button's value are skipped, a widget the save lacks takes its default, and the tiny swap resamples a
per-block vector onto the tiny model's blocks.
"""

from __future__ import annotations

import pytest
from harness.workflow_prompt import WorkflowError, resample_block_vector, swap_for_tiny, workflow_to_prompt

INFO = {
    "Src": {"input": {"required": {}}, "input_order": {"required": []}, "output": ["MODEL"]},
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "seed": ["INT", {"default": 0, "min": 0, "max": 100}],
                "steps": ["INT", {"default": 20, "min": 1, "max": 100}],
                "mode": [["a", "b"], {}],
            },
            "optional": {"note": ["STRING", {"default": "dflt"}]},
        },
        "input_order": {"required": ["model", "seed", "steps", "mode"], "optional": ["note"]},
        "output": ["LATENT"],
        "output_node": True,
    },
    "Filter": {
        "input": {"required": {"model": ["MODEL", {}], "amount": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["model", "amount"]},
        "output": ["MODEL"],
    },
    "Loader": {
        "input": {"required": {"image": [["x.png"], {"image_upload": True}], "n": ["INT", {"default": 1}]}},
        "input_order": {"required": ["image", "n"]},
        "output": ["IMAGE"],
    },
}


def node(nid, kind, inputs=(), outputs=(), values=(), mode=0):
    return {
        "id": nid,
        "type": kind,
        "mode": mode,
        "inputs": [dict(i) for i in inputs],
        "outputs": [dict(o) for o in outputs],
        "widgets_values": list(values),
    }


def graph() -> dict:
    """Src -> Reroute -> Filter (bypassed) -> Sampler, a PrimitiveNode on the sampler's steps, a note, a muted
    Filter, and a Loader with an upload button."""
    return {
        "nodes": [
            node(1, "Src", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}]),
            node(
                2, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}], outputs=[{"type": "MODEL", "links": [2]}]
            ),
            node(
                3,
                "Filter",
                inputs=[{"name": "model", "type": "MODEL", "link": 2}],
                outputs=[{"name": "MODEL", "type": "MODEL", "links": [3]}],
                values=[0.5],
                mode=4,
            ),
            node(
                4,
                "Sampler",
                inputs=[
                    {"name": "model", "type": "MODEL", "link": 3},
                    {"name": "steps", "type": "INT", "link": 4, "widget": {"name": "steps"}},
                ],
                values=[7, "fixed", 9, "b"],
            ),
            node(5, "PrimitiveNode", outputs=[{"type": "INT", "links": [4]}], values=[9, "fixed"]),
            node(6, "Note", values=["set things"]),
            node(7, "Filter", inputs=[{"name": "model", "type": "MODEL", "link": None}], values=[2.0], mode=2),
            node(8, "Loader", values=["x.png", "image", 3]),
        ],
        "links": [
            [1, 1, 0, 2, 0, "MODEL"],
            [2, 2, 0, 3, 0, "MODEL"],
            [3, 3, 0, 4, 0, "MODEL"],
            [4, 5, 0, 4, 1, "INT"],
        ],
    }


def test_graph_features_convert_as_the_frontend_does() -> None:
    """Reroute and bypass resolve to the source, the primitive's value stays, UI-only and muted nodes vanish,
    the seed's control and the upload button are skipped, and the missing optional widget takes its default."""
    prompt = workflow_to_prompt(graph(), INFO)
    assert sorted(prompt) == ["1", "4", "8"]
    assert prompt["4"]["inputs"] == {"model": ["1", 0], "seed": 7, "steps": 9, "mode": "b", "note": "dflt"}
    assert prompt["8"]["inputs"] == {"image": "x.png", "n": 3}


def test_unknown_node_type_is_named() -> None:
    """A node type the server lacks is reported with its id and type, not skipped."""
    workflow = graph()
    workflow["nodes"][0]["type"] = "Missing"
    with pytest.raises(WorkflowError, match="node 1: type 'Missing'"):
        workflow_to_prompt(workflow, INFO)


def test_tiny_swap_resamples_block_vectors_and_clamps_steps(tmp_path) -> None:
    """A 4B per-block vector (5 + 20) becomes the tiny model's 2 + 6, each tiny block taking the value at the same
    relative depth; steps shrink to the tiny value; an upload combo gets its file created in the input folder."""
    vector = "1 1 1 1 1, 0 0 0 0 0 0, 1 1 1 1 1 1 1 1, 0.5 0.5 0.5 0.5 0.5 0.5"
    assert resample_block_vector(vector) == "1, 1, 0, 0, 1, 1, 1, 0.5"
    assert resample_block_vector("1, 2, 3") == "1, 2, 3"  # not a real model's length: left for the node to judge
    swap = swap_for_tiny(workflow_to_prompt(graph(), INFO), INFO, input_dir=tmp_path)
    assert swap.prompt["4"]["inputs"]["steps"] == 2
    assert (tmp_path / "x.png").is_file() and swap.images == [tmp_path / "x.png"]
