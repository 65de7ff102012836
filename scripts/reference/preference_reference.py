#!/usr/bin/env python3
"""Reference values for loraops' preference training (DPO: sigmoid, robust, IPO, conservative;
ORPO; KTO), computed with TRL's own code on CPU in float32, recorded as test fixtures.

    python3 -m venv /var/tmp/loraops-py && /var/tmp/loraops-py/bin/pip install torch transformers peft trl safetensors
    /var/tmp/loraops-py/bin/python scripts/reference/preference_reference.py

TRL's DPOTrainer and KTOTrainer compute their losses and metrics in `_compute_loss`, which
is called here unbound, on a stand-in for the trainer object that carries the settings:
- fixed log-probabilities: a stand-in model returns given per-sequence log-probs (reference
  log-probs precomputed); loss, rewards and the gradients with respect to the policy's
  log-probs;
- the tiny model (the trainer's `init-tiny`, same bytes on both sides) with a PEFT LoRA adapter
  and TRL's fused LM head: TRL's whole path, the reference by disabling the adapter, KTO's KL
  sequences under no_grad; loss, TRL's logged metrics and the LoRA gradients.
- DPO continuing from an adapter: the PeftModel's adapter is the one training starts from, and
  TRL's DPOTrainer copies it into a frozen "ref" adapter (its `__init__` does so; the same lines
  here), which is then the reference. Recorded at the first step (policy = reference) and after
  the policy has moved; loraops' reference is the base with that adapter, frozen.
ORPO (TRL's experimental ORPOTrainer) uses its `odds_ratio_loss` and `get_batch_logps`; its NLL
term is the cross-entropy of the chosen completion tokens (TRL's ORPOTrainer also counts the
prompt tokens there; loraops masks prompts in every method). Conservative DPO (sigmoid with
label smoothing, as TRL before 1.0 computed it) has no code path in TRL 1.x; its formula is
written out below.

It writes trainer/tests/fixtures/preference.{json,safetensors}; CI does not run this, the Rust
tests compare against the recorded values.
"""

import json
import os
import subprocess
import sys
import tempfile
import types

import torch
import torch.nn.functional as F
import transformers
import peft
import trl
from collections import defaultdict

from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from trl import DPOTrainer, KTOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.utils import add_fused_lm_head

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(ROOT, "trainer", "tests", "fixtures")
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, seed=7)
LORA = dict(r=4, alpha=8.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Loss settings of each case (the options loraops takes, with TRL's names).
CASES = {
    "dpo_sigmoid": dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0),
    "dpo_robust": dict(beta=0.2, loss_type="robust", label_smoothing=0.1),
    "dpo_ipo": dict(beta=0.5, loss_type="ipo", label_smoothing=0.0),
    "dpo_cdpo": dict(beta=0.3, loss_type="sigmoid", label_smoothing=0.2),
    "orpo": dict(beta=0.25),
    "kto": dict(beta=0.2, desirable_weight=1.0, undesirable_weight=1.5),
}

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)


def trainer_cli(*args):
    cmd = ["cargo", "run", "-q", "-p", "loraops-trainer", "--example", "trainer", "--", *map(str, args)]
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", "/var/tmp/loraops-target-trainer")
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)


def peft_key(name):
    return name.replace(".default", "")


# --- TRL's code, called on a stand-in for the trainer object ---------------------------------

class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x

    def unwrap_model(self, m):
        return m


def _stub(model, **kw):
    return types.SimpleNamespace(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ref_model=None, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None), **kw)


def trl_dpo(model, inputs, c, precompute):
    """DPOTrainer._compute_loss: (loss, metrics)."""
    loss_type = c["loss_type"]
    if loss_type == "sigmoid" and c["label_smoothing"] > 0:
        raise ValueError("conservative DPO is not a TRL 1.x loss; see cdpo()")
    s = _stub(model, ld_alpha=None, precompute_ref_logps=precompute, f_divergence_type="reverse_kl",
              loss_types=[loss_type], loss_weights=[1.0], beta=c["beta"], label_smoothing=c["label_smoothing"],
              use_weighting=False)
    loss = DPOTrainer._compute_loss(s, model, inputs, False)
    return loss, {k: v[-1] for k, v in s._metrics["train"].items()}


def trl_kto(model, inputs, c, precompute):
    """KTOTrainer._compute_loss: (loss, metrics)."""
    s = _stub(model, precompute_ref_logps=precompute, calculate_KL=True, loss_type="kto", beta=c["beta"],
              desirable_weight=c["desirable_weight"], undesirable_weight=c["undesirable_weight"])
    s._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, s)
    loss = KTOTrainer._compute_loss(s, model, inputs, False)
    return loss, {k: v[-1] for k, v in s._metrics["train"].items()}


def trl_orpo(pc_mean, pr_mean, beta):
    return ORPOTrainer.odds_ratio_loss(_stub(None, beta=beta), pc_mean, pr_mean)


def cdpo(pc, pr, rc, rr, beta, eps):
    """Conservative DPO: TRL's sigmoid loss with label smoothing before 1.0."""
    logits = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


class FixedLogps(torch.nn.Module):
    """Stands in for a model with TRL's fused LM head: returns the per-token log-probs registered
    for the input_ids tensor it is called with (all of a sequence's log-prob at its first token)."""

    is_gradient_checkpointing = False

    def __init__(self):
        super().__init__()
        self.table = {}

    def register(self, ids, seq_logps):
        z = torch.zeros(ids.shape[0], ids.shape[1] - 2)
        self.table[ids.data_ptr()] = torch.cat([seq_logps.unsqueeze(1), z], dim=1)

    def forward(self, input_ids=None, **kw):
        lp = self.table[input_ids.data_ptr()]
        z = torch.zeros_like(lp)
        return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None)


def completion_mask(counts, t):
    """(n, t) masks with counts[i] completion tokens after one prompt token."""
    m = torch.zeros(len(counts), t, dtype=torch.int64)
    for i, c in enumerate(counts):
        m[i, 1:1 + c] = 1
    return m


# --- fixed log-probabilities -------------------------------------------------------------------

def fixed(tensors, meta):
    g = torch.Generator().manual_seed(17)
    n, t = 6, 12
    policy_chosen = -20 + 4 * torch.randn(n, generator=g)
    policy_rejected = -22 + 4 * torch.randn(n, generator=g)
    ref_chosen = policy_chosen + 2 * torch.randn(n, generator=g)
    ref_rejected = policy_rejected + 2 * torch.randn(n, generator=g)
    chosen_tokens = torch.randint(3, 10, (n,), generator=g)
    rejected_tokens = torch.randint(3, 10, (n,), generator=g)
    for k, v in dict(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                     ref_rejected=ref_rejected, chosen_tokens=chosen_tokens.float(),
                     rejected_tokens=rejected_tokens.float()).items():
        tensors[f"fixed.{k}"] = v.contiguous()
    out = {}
    for case in ["dpo_sigmoid", "dpo_robust", "dpo_ipo", "dpo_cdpo"]:
        c = CASES[case]
        pc = policy_chosen.clone().requires_grad_(True)
        pr = policy_rejected.clone().requires_grad_(True)
        if case == "dpo_cdpo":
            losses, cr, rr = cdpo(pc, pr, ref_chosen, ref_rejected, c["beta"], c["label_smoothing"])
            loss = losses.mean()
            metrics = {"rewards/chosen": cr.mean().item(), "rewards/rejected": rr.mean().item()}
        else:
            model = FixedLogps()
            ids = torch.zeros(2 * n, t, dtype=torch.int64)
            model.register(ids, torch.cat([pc, pr]))
            inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                          completion_mask=completion_mask(torch.cat([chosen_tokens, rejected_tokens]).tolist(), t),
                          ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
            loss, metrics = trl_dpo(model, inputs, c, precompute=True)
        loss.backward()
        tensors[f"fixed.{case}.grad.policy_chosen"] = pc.grad.contiguous()
        tensors[f"fixed.{case}.grad.policy_rejected"] = pr.grad.contiguous()
        out[case] = dict(c, loss=loss.item(), rewards_chosen=metrics["rewards/chosen"],
                         rewards_rejected=metrics["rewards/rejected"])

    # ORPO works on mean log-probs (negative, small).
    oc = -(0.3 + 2 * torch.rand(n, generator=g))
    orj = -(0.5 + 2 * torch.rand(n, generator=g))
    tensors["fixed.orpo.policy_chosen"] = oc.contiguous()
    tensors["fixed.orpo.policy_rejected"] = orj.contiguous()
    pc, pr = oc.clone().requires_grad_(True), orj.clone().requires_grad_(True)
    losses, _, _, ratio, log_odds = trl_orpo(pc, pr, CASES["orpo"]["beta"])
    loss = -losses.mean()  # ORPO's loss is nll - mean(losses)
    loss.backward()
    tensors["fixed.orpo.grad.policy_chosen"] = pc.grad.contiguous()
    tensors["fixed.orpo.grad.policy_rejected"] = pr.grad.contiguous()
    out["orpo"] = dict(CASES["orpo"], loss=loss.item(), log_odds_ratio=ratio.item(), log_odds_chosen=log_odds.item())

    # KTO: 4 desirable rows then 3 undesirable ones; the KL estimate from 7 mismatched pairs.
    kc = -15 + 3 * torch.randn(4, generator=g)
    kr = -18 + 3 * torch.randn(3, generator=g)
    rkc = kc + torch.randn(4, generator=g)
    rkr = kr + torch.randn(3, generator=g)
    rkl = -30 + 3 * torch.randn(7, generator=g)
    pkl = rkl + 1.0 + torch.randn(7, generator=g)  # a positive KL estimate
    for k, v in dict(policy_chosen=kc, policy_rejected=kr, ref_chosen=rkc, ref_rejected=rkr, policy_kl=pkl, ref_kl=rkl).items():
        tensors[f"fixed.kto.{k}"] = v.contiguous()
    c = CASES["kto"]
    pc, pr = kc.clone().requires_grad_(True), kr.clone().requires_grad_(True)
    model = FixedLogps()
    ids = torch.zeros(7, t, dtype=torch.int64)
    kl_ids = torch.zeros(7, t, dtype=torch.int64)
    model.register(ids, torch.cat([pc, pr]))
    model.register(kl_ids, pkl)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=completion_mask([5] * 7, t),
                  KL_input_ids=kl_ids, KL_attention_mask=torch.ones_like(kl_ids), KL_completion_mask=completion_mask([5] * 7, t),
                  label=torch.tensor([True] * 4 + [False] * 3), ref_logps=torch.cat([rkc, rkr]), ref_KL_logps=rkl)
    loss, metrics = trl_kto(model, inputs, c, precompute=True)
    loss.backward()
    tensors["fixed.kto.grad.policy_chosen"] = pc.grad.contiguous()
    tensors["fixed.kto.grad.policy_rejected"] = pr.grad.contiguous()
    out["kto"] = dict(c, loss=loss.item(), kl=metrics["kl"], rewards_chosen=metrics["rewards/chosen"],
                      rewards_rejected=metrics["rewards/rejected"])
    meta["fixed"] = out


# --- the tiny model ----------------------------------------------------------------------------

def padded(seqs):
    """Right-padded ids (pad 0), labels (-100 on prompt and padding), attention mask, lengths."""
    t = max(len(ids) for ids, _ in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.int64)
    labels = torch.full((len(seqs), t), -100, dtype=torch.int64)
    mask = torch.zeros(len(seqs), t, dtype=torch.int64)
    for i, (x, n_prompt) in enumerate(seqs):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, n_prompt:len(x)] = torch.tensor(x[n_prompt:])
        mask[i, :len(x)] = 1
    return ids, labels, mask, torch.tensor([len(x) for x, _ in seqs])


def record(tensors, prefix, seqs):
    ids, labels, mask, lens = padded(seqs)
    tensors[f"{prefix}.ids"] = ids
    tensors[f"{prefix}.labels"] = labels
    tensors[f"{prefix}.len"] = lens
    return ids, labels, mask


def tiny(tensors, meta, model_dir):
    g = torch.Generator().manual_seed(23)
    vocab = TINY["vocab"]

    def toks(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    # Three pairs: a prompt shared by chosen and rejected, completions of different lengths.
    prompts = [toks(n) for n in (4, 6, 3)]
    chosen = [p + toks(n) for p, n in zip(prompts, (5, 3, 7))]
    rejected = [p + toks(n) for p, n in zip(prompts, (4, 6, 5))]
    c_ids, c_lab, c_mask = record(tensors, "model.chosen", [(x, len(p)) for x, p in zip(chosen, prompts)])
    r_ids, r_lab, r_mask = record(tensors, "model.rejected", [(x, len(p)) for x, p in zip(rejected, prompts)])
    # KTO: four rows, labels mixed; the KL sequence of row i is its prompt with row i-1's
    # completion (as loraops pairs them).
    k_prompts = [toks(n) for n in (3, 5, 4, 6)]
    k_comps = [toks(n) for n in (5, 4, 6, 3)]
    k_labels = [True, False, True, False]
    kto_seqs = [(p + c, len(p)) for p, c in zip(k_prompts, k_comps)]
    kl_seqs = [(p + k_comps[(i - 1) % 4], len(p)) for i, p in enumerate(k_prompts)]
    k_ids, k_lab, k_mask = record(tensors, "model.kto.completion", kto_seqs)
    kl_ids, kl_lab, kl_mask = record(tensors, "model.kto.kl", kl_seqs)
    meta["kto_labels"] = k_labels

    cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    torch.manual_seed(31)
    model = peft.get_peft_model(base, cfg)
    model.train()  # no dropout (lora_dropout 0); TRL's metrics are recorded under "train"
    params = {peft_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    gw = torch.Generator().manual_seed(37)
    with torch.no_grad():
        for k, p in params.items():
            if ".lora_B." in k:
                p.copy_(torch.randn(p.shape, generator=gw) * 0.2)
            tensors["lora." + k] = p.detach().clone().contiguous()
    meta["lora"] = LORA

    # Chosen and rejected in one batch, as TRL's collator builds it (same padded length).
    t = max(c_ids.shape[1], r_ids.shape[1])

    def pad_to(x, value):
        return F.pad(x, (0, t - x.shape[1]), value=value)

    pair_ids = torch.cat([pad_to(c_ids, 0), pad_to(r_ids, 0)])
    pair_lab = torch.cat([pad_to(c_lab, -100), pad_to(r_lab, -100)])
    pair_mask = torch.cat([pad_to(c_mask, 0), pad_to(r_mask, 0)])
    pair_inputs = dict(input_ids=pair_ids, attention_mask=pair_mask, completion_mask=(pair_lab != -100).long())
    b = len(prompts)
    out = {}
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]

    def grads(case):
        for k, p in params.items():
            tensors[f"model.{case}.grad.{k}"] = p.grad.detach().clone().contiguous()
            p.grad = None

    def seq_logps(ids, labels, mask):
        return model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs.sum(-1)

    for case in ["dpo_sigmoid", "dpo_robust", "dpo_ipo", "dpo_cdpo"]:
        c = CASES[case]
        if case == "dpo_cdpo":
            logps = seq_logps(pair_ids, pair_lab, pair_mask)
            with torch.no_grad(), model.disable_adapter():
                ref = seq_logps(pair_ids, pair_lab, pair_mask)
            losses, cr, rr = cdpo(logps[:b], logps[b:], ref[:b], ref[b:], c["beta"], c["label_smoothing"])
            loss = losses.mean()
            m = {"rewards/chosen": cr.mean().item(), "rewards/rejected": rr.mean().item(),
                 "rewards/accuracies": (cr > rr).float().mean().item(), "rewards/margins": (cr - rr).mean().item(),
                 "logps/chosen": logps[:b].mean().item(), "logps/rejected": logps[b:].mean().item()}
        else:
            loss, m = trl_dpo(model, pair_inputs, c, precompute=False)
        loss.backward()
        grads(case)
        out[case] = dict(options=c, loss=loss.item(), metrics={k: m[k] for k in names})

    # ORPO: NLL of the chosen completion tokens - mean(beta * log sigma(log-odds)) on mean log-probs.
    c = CASES["orpo"]
    logits = model(input_ids=pair_ids, attention_mask=pair_mask).logits
    mean_logps = ORPOTrainer.get_batch_logps(logits, pair_lab, average_log_prob=True)
    nll = F.cross_entropy(logits[:b, :-1].reshape(-1, logits.shape[-1]), pair_lab[:b, 1:].reshape(-1), ignore_index=-100)
    losses, cr, rr, ratio, log_odds = trl_orpo(mean_logps[:b], mean_logps[b:], c["beta"])
    loss = nll - losses.mean()
    loss.backward()
    grads("orpo")
    metrics = {
        "rewards/chosen": cr.mean().item(), "rewards/rejected": rr.mean().item(),
        "rewards/accuracies": (cr > rr).float().mean().item(), "rewards/margins": (cr - rr).mean().item(),
        "logps/chosen": mean_logps[:b].mean().item(), "logps/rejected": mean_logps[b:].mean().item(),
        "nll_loss": nll.item(), "log_odds_ratio": ratio.item(), "log_odds_chosen": log_odds.item(),
    }
    out["orpo"] = dict(options=dict(beta=c["beta"]), loss=loss.item(), metrics=metrics)

    # KTO: TRL's whole path; KL sequences under no_grad, references with the adapter disabled.
    c = CASES["kto"]
    kto_inputs = dict(input_ids=k_ids, attention_mask=k_mask, completion_mask=(k_lab != -100).long(),
                      KL_input_ids=kl_ids, KL_attention_mask=kl_mask, KL_completion_mask=(kl_lab != -100).long(),
                      label=torch.tensor(k_labels))
    loss, m = trl_kto(model, kto_inputs, c, precompute=False)
    loss.backward()
    grads("kto")
    keys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"]
    out["kto"] = dict(options=c, loss=loss.item(), metrics={k: m[k] for k in keys})

    # DPO continuing from an adapter (last: with a "ref" adapter present, TRL's DPO and KTO
    # take it as the reference). The adapter training starts from is the one above; TRL's
    # DPOTrainer.__init__ copies it into "ref" like this.
    model.add_adapter("ref", model.peft_config["default"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name:
                model.get_parameter(name.replace(".default.", ".ref.")).copy_(param.data)
    c = CASES["dpo_sigmoid"]
    # The first step: the policy is its reference (loss ln 2, rewards 0).
    loss, m = trl_dpo(model, pair_inputs, c, precompute=False)
    loss.backward()
    grads("dpo_from_adapter_start")
    out["dpo_from_adapter_start"] = dict(options=c, loss=loss.item(), metrics={k: m[k] for k in names})
    # Later: the policy has moved away from the frozen reference.
    gm = torch.Generator().manual_seed(41)
    with torch.no_grad():
        for k, p in params.items():
            p.add_(torch.randn(p.shape, generator=gm) * 0.05)
            tensors["dpo_from_adapter.policy." + k] = p.detach().clone().contiguous()
    loss, m = trl_dpo(model, pair_inputs, c, precompute=False)
    loss.backward()
    grads("dpo_from_adapter")
    out["dpo_from_adapter"] = dict(options=c, loss=loss.item(), metrics={k: m[k] for k in names})
    meta["model"] = out


def main():
    tensors = {}
    meta = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                         "trl": trl.__version__}}
    fixed(tensors, meta)
    work = tempfile.mkdtemp(prefix="loraops-pref-ref-")
    model_dir = os.path.join(work, "tiny")
    trainer_cli("init-tiny", model_dir, "--layers", TINY["layers"], "--hidden", TINY["hidden"], "--heads", TINY["heads"],
                "--kv-heads", TINY["kv_heads"], "--vocab", TINY["vocab"], "--seed", TINY["seed"])
    meta["tiny"] = TINY
    tiny(tensors, meta, model_dir)
    os.makedirs(FIXTURES, exist_ok=True)
    save_file(tensors, os.path.join(FIXTURES, "preference.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(FIXTURES, "preference.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    print("wrote", FIXTURES, file=sys.stderr)


if __name__ == "__main__":
    main()
