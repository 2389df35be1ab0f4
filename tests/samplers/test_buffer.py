"""ChainBuffer: draws and write-backs, restarts from init_fn, ring appends, bit-exact state_dict round trips,
devices, and bad input. (The energyflow objectives built on it keep their own tests and golden values.)"""
import math

import pytest
import torch

from samplers import Langevin
from samplers.buffer import ChainBuffer


def constant(value):
    """An init_fn whose states are all ``value`` (so a restarted row is recognisable)."""

    def init_fn(shape, *, device, dtype, generator):
        return torch.full(tuple(shape), float(value), device=device, dtype=dtype)

    return init_fn


def noise(shape, *, device, dtype, generator):
    return torch.randn(tuple(shape), device=device, dtype=dtype, generator=generator)


def filled(capacity=6, reinit_fraction=0.0, init_fn=noise, seed=0):
    buffer = ChainBuffer(capacity, init_fn=init_fn, reinit_fraction=reinit_fraction,
                         generator=torch.Generator().manual_seed(seed))
    buffer.fill((2,))
    return buffer


def test_draws_are_stored_rows_and_write_back_goes_to_their_indices():
    buffer = filled()
    assert len(buffer) == 6 and buffer.states.shape == (6, 2)
    draw = buffer.sample(50)
    assert draw.indices.shape == (50,) and int(draw.indices.min()) >= 0 and int(draw.indices.max()) < 6
    assert torch.equal(draw.states, buffer.states[draw.indices]) and not draw.restarted.any()
    assert len(set(draw.indices.tolist())) == 6  # uniform with replacement: 50 draws reach all 6 rows
    before = buffer.states.clone()
    indices = torch.tensor([4, 1])
    buffer.write(indices, torch.tensor([[10.0, 11.0], [12.0, 13.0]]))
    assert torch.equal(buffer.states[4], torch.tensor([10.0, 11.0]))
    assert torch.equal(buffer.states[1], torch.tensor([12.0, 13.0]))
    untouched = [0, 2, 3, 5]
    assert torch.equal(buffer.states[untouched], before[untouched])


def test_persistent_chains_with_a_sampler_advance_the_drawn_rows():
    """The PCD loop: draw initial states, run any sampler, write the final states back."""
    buffer, generator = filled(capacity=8), torch.Generator().manual_seed(3)
    before = buffer.states.clone()
    draw = buffer.sample(4, generator=generator)  # the call's generator takes precedence over the buffer's own
    final = Langevin(0.1).run(lambda y: 0.5 * y.pow(2).sum(-1), draw.states, num_steps=3,
                              generator=generator).final_state
    buffer.write(draw.indices, final)
    last = {int(i): row for i, row in zip(draw.indices, final)}  # duplicates: the later write wins
    for index, row in last.items():
        assert torch.equal(buffer.states[index], row)
    untouched = [i for i in range(8) if i not in last]
    assert torch.equal(buffer.states[untouched], before[untouched])


def test_reinit_fraction_restarts_that_share_of_rows_from_init_fn():
    buffer = filled(capacity=10, reinit_fraction=1.0, init_fn=constant(-1.0))
    buffer.write(torch.arange(10), torch.arange(20.0).view(10, 2))
    assert torch.equal(buffer.sample(7).states, torch.full((7, 2), -1.0))
    fraction, num = 0.3, 20000
    buffer = filled(capacity=10, reinit_fraction=fraction, init_fn=constant(-1.0))
    buffer.write(torch.arange(10), torch.arange(20.0).view(10, 2))
    draw = buffer.sample(num)
    restarted = draw.restarted
    assert torch.equal(draw.states[restarted], torch.full((int(restarted.sum()), 2), -1.0))
    assert torch.equal(draw.states[~restarted], buffer.states[draw.indices[~restarted]])
    # a Bernoulli per row: the restarted share within 4 binomial standard errors (sd 0.0032 at 20,000 rows)
    assert abs(float(restarted.double().mean()) - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / num)


def test_the_random_stream_a_draw_consumes_does_not_depend_on_the_fraction():
    states = []
    for fraction in (0.0, 0.7):
        buffer = filled(reinit_fraction=fraction)
        buffer.sample(5)
        states.append(buffer.generator.get_state())
    assert torch.equal(states[0], states[1])


def test_append_fills_in_ring_order_with_companions():
    buffer = ChainBuffer(4, generator=torch.Generator().manual_seed(0))
    buffer.append(torch.arange(3.0).view(3, 1), torch.tensor([10, 11, 12]))
    assert (len(buffer), buffer.position) == (3, 3) and buffer.fields[1].dtype == torch.int64
    buffer.append(torch.tensor([[3.0], [4.0]]), torch.tensor([13, 14]))  # the oldest row (0) is overwritten
    assert (len(buffer), buffer.position) == (4, 1)
    assert buffer.states.flatten().tolist() == [4.0, 1.0, 2.0, 3.0] and buffer.fields[1].tolist() == [14, 11, 12, 13]
    draw = buffer.sample(30)
    assert torch.equal(draw.companions[0], buffer.fields[1][draw.indices])  # companions travel with their state
    assert torch.equal(draw.states.flatten() + 10, draw.companions[0].to(draw.states.dtype))
    buffer.append(torch.arange(6.0).view(6, 1) + 100, torch.arange(6) + 110)  # oversized: the newest 4 survive
    assert sorted(buffer.states.flatten().tolist()) == [102.0, 103.0, 104.0, 105.0]


def test_state_dict_round_trip_is_bit_exact_with_weights_only_loading(tmp_path):
    buffer = filled(capacity=5, reinit_fraction=0.4)
    draw = buffer.sample(3)
    buffer.write(draw.indices, draw.states + 1.0)
    torch.save(buffer.state_dict(), tmp_path / "buffer.pt")
    restored = ChainBuffer(5, init_fn=noise, reinit_fraction=0.4, generator=torch.Generator().manual_seed(99))
    restored.load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=True))
    assert (restored.size, restored.position) == (buffer.size, buffer.position)
    assert torch.equal(restored.states, buffer.states)
    for _ in range(3):  # the same rows and the same fresh states, drawn with the restored generator
        a, b = buffer.sample(4), restored.sample(4)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.states, b.states)
        assert torch.equal(a.restarted, b.restarted)


def test_the_store_follows_the_module_and_draws_come_back_where_asked():
    buffer = filled()
    assert buffer.sample(3, dtype=torch.float64).states.dtype == torch.float64
    buffer.to(torch.float64)
    assert buffer.states.dtype == torch.float64
    buffer.to("meta")  # a device move without a GPU: every stored field goes along
    assert buffer.states.device.type == "meta"
    cpu = ChainBuffer(3, generator=torch.Generator().manual_seed(0))
    cpu.append(torch.ones(2, 1))
    assert cpu.sample(2, device="meta").states.device.type == "meta"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        ChainBuffer(0)
    with pytest.raises(ValueError, match=r"reinit_fraction must be in \[0, 1\]"):
        ChainBuffer(3, init_fn=noise, reinit_fraction=1.5)
    with pytest.raises(ValueError, match="pass init_fn"):
        ChainBuffer(3, reinit_fraction=0.5)
    with pytest.raises(TypeError, match="torch.Generator"):
        ChainBuffer(3, generator=0)
    with pytest.raises(ValueError, match="fill draws states from init_fn"):
        ChainBuffer(3).fill((2,))
    with pytest.raises(ValueError, match="need a torch.Generator"):
        ChainBuffer(3, init_fn=noise).fill((2,))
    empty = ChainBuffer(3, generator=torch.Generator())
    with pytest.raises(ValueError, match="empty"):
        empty.sample(1)
    with pytest.raises(ValueError, match="fill\\(\\) or append\\(\\) first"):
        empty.write(torch.tensor([0]), torch.zeros(1, 2))
    buffer = filled()
    with pytest.raises(ValueError, match="num >= 1"):
        buffer.sample(0)
    with pytest.raises(ValueError, match="do not match the stored states"):
        buffer.write(torch.tensor([0]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="do not match the stored fields"):
        buffer.append(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same leading"):
        ChainBuffer(3).append(torch.zeros(2, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="capacity=6 to resume"):
        ChainBuffer(4, generator=torch.Generator()).load_state_dict(buffer.state_dict())
    with pytest.raises(ValueError, match="own generator state"):
        ChainBuffer(6).load_state_dict(buffer.state_dict())
