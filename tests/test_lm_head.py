"""The chunked LM head on 8 fake CPU devices: a kernel copy per shard of rows (model/lm_head.py
`gathered`) gives the NLL and gradients of float64 NumPy, and its gradient leaves split over fsdp
(and its vocabulary over `tensor`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from model import lm_head, sharding


def _reference(h, w, y, weight):
  """float64: sum(weight * nll) and its gradients wrt h [b, t, d] and w [d, v]."""
  z = h @ w                                                     # [b, t, v]
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  nll = lse - np.take_along_axis(z, y[..., None], -1)[..., 0]
  dz = np.exp(z - lse[..., None])
  np.put_along_axis(dz, y[..., None], np.take_along_axis(dz, y[..., None], -1) - 1, -1)
  dz *= weight[..., None]
  return (weight * nll).sum(), dz @ w.T, np.einsum("btd,btv->dv", h, dz)


@pytest.mark.eight_devices
@pytest.mark.parametrize("tied,vocab,chunk,fsdp,tensor", [(False, 1536, 32, 4, 1), (True, 384, 0, 4, 1),
                                                         (False, 512, 16, 2, 2)])
def test_kernel_copies_per_row_shard_give_numpys_nll_and_gradients(tied, vocab, chunk, fsdp, tensor):
  mesh = sharding.make_mesh(dict(data=2, fsdp=fsdp, tensor=tensor))
  rng = np.random.default_rng(vocab)
  b, t, d = 8, 64, 32
  h = rng.standard_normal((b, t, d)) * 0.5
  w = rng.standard_normal((d, vocab)) * 0.5
  y = rng.integers(0, vocab, (b, t))
  weight = rng.random((b, t))
  stored = w.T if tied else w                                   # the tied embedding is [vocab, d]
  split = "tensor" if tensor > 1 else None                       # the vocabulary over `tensor`
  own = P(split, "fsdp") if tied else P("fsdp", split)

  def loss(h, kernel, y, weight):
    assert lm_head.row_shards(h.shape[0]) == 2 * fsdp           # the copies path, not the plain one
    nll, _ = lm_head.token_nll(h, kernel, tied, y, chunk)
    return jnp.sum(nll * weight)

  args = [jax.device_put(np.asarray(a, np.float32), NamedSharding(mesh, s))
          for a, s in ((h, P(("data", "fsdp"))), (stored, own), (y, P(("data", "fsdp"))),
                       (weight, P(("data", "fsdp"))))]
  args[2] = args[2].astype(jnp.int32)
  with sharding.use_mesh(mesh):
    value, (dh, dk) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(*args)
  ref, ref_dh, ref_dw = _reference(h, w, y, weight)
  np.testing.assert_allclose(value, ref, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(dk), ref_dw.T if tied else ref_dw, rtol=2e-4, atol=2e-5)
  assert dk.sharding.is_equivalent_to(NamedSharding(mesh, own), 2)  # reduce-scattered to the kernel's own shards
  local = (vocab // tensor, d // fsdp)
  assert dk.addressable_shards[0].data.shape == (local if tied else local[::-1])
