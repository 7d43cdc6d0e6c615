"""LoRA and QA-LoRA baselines against float64 references written in the test."""

import torch
from layers import random_qlinear

from lotaqaf_cli.core.lora import LoRALinear, QALoRALinear
from lotaqaf_cli.core.qlinear import QuantLinear


def make_base(act_order=False, bias=True):
    return random_qlinear(64, 32, 4, 16, seed=0, act_order=act_order, bias=bias, zeros="integer", scales=(0.2, 0.2))


def test_lora_starts_as_noop_and_matches_reference():
    base = make_base()
    lora = LoRALinear(base, rank=4, alpha=8)
    x = torch.randn(3, 5, 64)
    assert torch.equal(lora(x), base(x))
    with torch.no_grad():
        lora.lora_B.normal_()
    ref = base(x).double() + x.double() @ lora.lora_A.double() @ lora.lora_B.double() * 2.0
    torch.testing.assert_close(lora(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_qalora_pools_per_group_and_folds_into_zero_points():
    for act_order in (False, True):
        base = make_base(act_order)
        qa = QALoRALinear(base, rank=4, alpha=8)
        with torch.no_grad():
            qa.lora_B.normal_()
        x = torch.randn(2, 7, 64, dtype=torch.float64)
        # float64 reference: pooled input by explicit loops over the groups of g_idx
        pooled = torch.zeros(2, 7, 4, dtype=torch.float64)
        for gi in range(4):
            rows = (base.g_idx == gi).nonzero().flatten()
            pooled[..., gi] = x[..., rows].mean(-1)
        ref = base(x.float()).double() + pooled @ qa.lora_A.double() @ qa.lora_B.double() * 2.0
        torch.testing.assert_close(qa(x.float()).double(), ref, rtol=1e-4, atol=1e-4)
        # folding: a plain QuantLinear with z' = z - shift computes the same function
        folded = QuantLinear.from_quantized(base.codes, base.scales, base.zeros - qa.zero_point_shift().detach(),
                                            base.g_idx, 4, 16, base.bias)
        torch.testing.assert_close(folded(x.float()), qa(x.float()), rtol=1e-4, atol=1e-4)


def test_unmerged_export_branches_compute_the_adapter():
    """export.source=adapter writes a LoRA-type layer as its base plus a standard PEFT LoRA pair (scaling folded
    into B; QA-LoRA's pooling as a repeated A): that pair computes the adapter (float64 references above)."""
    from lotaqaf_cli.stages.export import lora_branch_model, with_branches

    for cls in (LoRALinear, QALoRALinear):
        base = make_base(act_order=cls is QALoRALinear)
        model = torch.nn.Sequential(cls(base, rank=4, alpha=8))
        with torch.no_grad():
            model[0].lora_B.normal_()
        plain, branches = lora_branch_model(model)
        assert isinstance(plain[0], QuantLinear) and branches["0"][0].shape == (4, 64) and branches["0"][1].shape == (32, 4)
        x = torch.randn(2, 5, 64)
        torch.testing.assert_close(with_branches(plain, branches)(x), model(x), rtol=1e-5, atol=1e-5)
