import hcl2

from pipeline.render.hcl import Block, Expr, dumps, fmt


def test_alignment_like_packer_fmt():
    text = 'a = 1\nlonger = "x"\nlist = [\n  1,\n]\nb = 2\n'
    assert fmt(text) == 'a      = 1\nlonger = "x"\nlist = [\n  1,\n]\nb = 2\n'


def test_blocks_round_trip_through_hcl2():
    text = dumps([
        Block("variable", ("accelerator",), {"type": Expr("string"), "default": 'say "hi" \\ bye'}),
        Block("source", ("qemu", "x"), {"accelerator": Expr("var.accelerator"), "qemuargs": [["-cpu", "max"]],
                                        "headless": True, "disk_size": "64M", "cpus": 2}),
    ])
    data = hcl2.loads(text)
    src = data["source"][0]['"qemu"']['"x"']
    assert src["accelerator"] == "${var.accelerator}"
    assert src["headless"] is True and src["cpus"] == 2
    assert data["variable"][0]['"accelerator"']["default"] == '"say \\"hi\\" \\\\ bye"'
    assert "\n\n\n" not in text and text.endswith("}\n")
