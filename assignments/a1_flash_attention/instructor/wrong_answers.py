"""Plausible wrong answers to assignment 1, each as a small edit of the reference solution (or a
whole replacement cell), with the tests that must reject it. tests/test_assignments.py applies
each one to the instructor's notebook and checks that every listed test fails on an assertion,
and that every hidden test rejects at least one of them. (Some are caught by the public tests too,
e.g. "no rescale" and "no D term" by the plain cases; only the hidden test is listed, to keep
`make test` short.)"""

from grading import Wrong

WRONG = [
    Wrong(
        "no rescale",
        "A1-1",
        "keeps the running sum and values when the maximum grows (forgets exp(m - m'))",
        ("test_forward_on_the_hard_case",),
        edits={
            "l = l * scale + p.sum(-1)": "l = l + p.sum(-1)",
            "acc = acc * scale[..., None] + pv": "acc = acc + pv",
        },
    ),
    Wrong(
        "mask then cap",
        "A1-1",
        "caps the masked logits (chapter 05's pitfall): a masked key gets logit -cap, not -inf",
        ("test_forward_on_the_hard_case",),
        edits={
            """    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    masked = jnp.where(mask_c[:, :, None, None, :], s, MASK_VALUE)
""": """    masked = jnp.where(mask_c[:, :, None, None, :], s, MASK_VALUE)
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
        masked = softcap * jnp.tanh(masked / softcap)
"""
        },
    ),
    Wrong(
        "-inf mask",
        "A1-1",
        "masks with -inf: a padding query (no visible key) gets exp(-inf - -inf) = NaN",
        ("test_forward_on_the_hard_case",),
        edits={"s, MASK_VALUE)": "s, -jnp.inf)"},
    ),
    Wrong(
        "filler columns as masked keys",
        "A1-1",
        "the columns that fill the last block count as masked keys: a padding query averages "
        "over n * C values instead of S",
        ("test_forward_on_the_hard_case",),
        edits={"    masked = jnp.where(real_c, masked, -jnp.inf)\n": ""},
    ),
    Wrong(
        "last block dropped",
        "A1-1",
        "n = S // C (floor): the keys of a short last block are never seen",
        ("test_forward_on_the_hard_case",),
        edits={
            "n = -(-s // block)": "n = s // block",
            "pad = n * block - s": "pad = 0",
            "    m = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))": "    m = mask[:, :, :n * block]",
            "x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))": "x = x[:, :n * block]",
        },
    ),
    Wrong(
        "no cap derivative",
        "A1-2",
        "differentiates as if there were no soft-cap (drops 1 - (s / c)^2)",
        ("test_gradients_on_the_hard_case",),
        edits={
            """        if softcap is not None:
            ds = ds * (1.0 - jnp.square(capped / softcap))      # d c tanh(z / c) / dz
""": ""
        },
    ),
    Wrong(
        "no D term",
        "A1-2",
        "ds = P dP: forgets the softmax's shift D = dO . O",
        ("test_gradients_on_the_hard_case",),
        edits={"ds = p * (dp - delta[..., None])": "ds = p * dp"},
    ),
    Wrong(
        "one head per group",
        "A1-2",
        "dk and dv from the first query head of each group, not summed over the G heads "
        "(what taking every G-th row of a repeated-KV gradient gives)",
        ("test_gradients_on_the_hard_case",),
        edits={
            'dv = jnp.einsum("BTKGC,BTKGH->BCKH", p, do)': (
                'dv = g * jnp.einsum("BTKC,BTKH->BCKH", p[:, :, :, 0], do[:, :, :, 0])'
            ),
            'dk = jnp.einsum("BTKGC,BTKGH->BCKH", ds, qg)': (
                'dk = g * jnp.einsum("BTKC,BTKH->BCKH", ds[:, :, :, 0], qg[:, :, :, 0])'
            ),
        },
    ),
    Wrong(
        "a wrapper",
        "A1-3",
        "calls the package's gqa_attention: right numbers, all (T, S) probabilities kept",
        ("test_training_memory_is_cut",),
        source="def flash_attention(q, k, v, mask, softcap=None, block=64):\n"
        "    return gqa_attention(q, k, v, mask, softcap=softcap)[0]\n",
    ),
    Wrong(
        "autodiff through the scan",
        "A1-3",
        "no custom_vjp: JAX stores every scan step's probabilities for the backward pass",
        ("test_training_memory_is_cut",),
        source="def flash_attention(q, k, v, mask, softcap=None, block=64):\n"
        "    return flash_forward(q, k, v, mask, softcap, block)[0]\n",
    ),
    Wrong(
        "forward only",
        "A1-4",
        "measures the compiled forward pass instead of the gradient",
        ("test_grad_temp_bytes_measures_the_gradient",),
        edits={"jax.jit(jax.grad(loss, argnums=(0, 1, 2)))": "jax.jit(loss)"},
    ),
    Wrong(
        "argument bytes",
        "A1-4",
        "reads argument_size_in_bytes (the inputs), the same for every attention",
        ("test_grad_temp_bytes_measures_the_gradient",),
        edits={"temp_size_in_bytes": "argument_size_in_bytes"},
    ),
]
