import sys, numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
r = GGUFReader('/work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf')
T = {t.name: t for t in r.tensors}
def W(name):
    t = T[name]
    a = dequantize(t.data, t.tensor_type).astype(np.float64)
    return a.reshape([int(x) for x in reversed(t.shape)]) if a.ndim==1 and len(t.shape)>1 else a
ids = [int(x) for x in sys.argv[1:]]
L, E, H, KV, D = 30, 576, 9, 3, 64
emb = W('token_embd.weight').reshape(49152, E)
x = emb[ids].copy()
n = len(ids)
pos = np.arange(n)
inv = 100000.0 ** (-np.arange(0, D, 2) / D)
ang = pos[:, None] * inv[None, :]
cos, sin = np.cos(ang), np.sin(ang)
def rope(v):  # v: n x heads x D, adjacent pairs
    a, b = v[..., 0::2], v[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(v); out[..., 0::2] = a*c - b*s; out[..., 1::2] = a*s + b*c
    return out
def rms(v, w): return v / np.sqrt((v*v).mean(-1, keepdims=True) + 1e-5) * w
for l in range(L):
    p = f'blk.{l}.'
    h = rms(x, W(p+'attn_norm.weight'))
    q = (h @ W(p+'attn_q.weight').reshape(E, E).T).reshape(n, H, D)
    k = (h @ W(p+'attn_k.weight').reshape(KV*D, E).T).reshape(n, KV, D)
    v = (h @ W(p+'attn_v.weight').reshape(KV*D, E).T).reshape(n, KV, D)
    q, k = rope(q), rope(k)
    out = np.zeros((n, H, D))
    for hh in range(H):
        g = hh // 3
        s = q[:, hh, :] @ k[:, g, :].T / 8.0
        s = s + np.triu(np.full((n, n), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True)); s /= s.sum(-1, keepdims=True)
        out[:, hh, :] = s @ v[:, g, :]
    x = x + out.reshape(n, E) @ W(p+'attn_output.weight').reshape(E, E).T
    h = rms(x, W(p+'ffn_norm.weight'))
    gt = h @ W(p+'ffn_gate.weight').reshape(1536, E).T
    up = h @ W(p+'ffn_up.weight').reshape(1536, E).T
    x = x + (gt / (1 + np.exp(-gt)) * up) @ W(p+'ffn_down.weight').reshape(E, 1536).T
h = rms(x[-1], W('output_norm.weight'))
lg = emb @ h
print(' '.join('%.4f' % lg[i*1000+7] for i in range(8)))
