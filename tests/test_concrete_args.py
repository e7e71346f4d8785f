"""``create_concrete_args``: fake inputs of one compile size, built from symbolic placeholders.

Property-based: hypothesis draws placeholder values the way Dynamo leaves them on a graph's
placeholders: fake tensors of a real ``FakeTensorMode`` with a real ``ShapeEnv``, whose sizes,
strides and storage offsets are expressions of one or several symbols, plus plain ``SymInt``,
int and None placeholders. Symbol 0 is the batch size, passed as the piece's batch-size input;
some others are proven equal to it (as Dynamo proves two inputs' lengths equal), the rest are
independent (a second dynamic dimension, the stride of a view into a larger buffer). Each result
must be the expression evaluated with the compile size for the batch symbols and the traced
value (the hint) for every other symbol (upstream issue #50046), keep dtype, device and
requires_grad, and be a FakeTensor: no real storage, even for sizes whose real tensors would
need terabytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from vllm.compilation.piecewise_backend import create_concrete_args

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.float16]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)


@dataclass(frozen=True)
class Expr:
    """``scale * symbol + constant``, or a constant when ``symbol`` is None."""

    scale: int
    symbol: int | None
    constant: int

    def at(self, values: list[int]) -> int:
        """The value with symbol i set to ``values[i]``."""
        return self.constant + (self.scale * values[self.symbol] if self.symbol is not None else 0)

    def build(self, symbols: list[torch.SymInt]) -> torch.SymInt | int:
        if self.symbol is None:
            return self.constant
        return self.scale * symbols[self.symbol] + self.constant


@dataclass(frozen=True)
class TensorRecipe:
    dims: tuple[Expr, ...]
    order: tuple[int, ...]  # memory order, innermost last (a permutation of the dims)
    broadcast: tuple[bool, ...]  # stride 0 (an expanded dimension)
    offset: Expr | None
    dtype: torch.dtype
    requires_grad: bool


def _strides(shape: list, order: tuple[int, ...], broadcast: tuple[bool, ...]) -> list:
    strides: list = [0] * len(shape)
    running: object = 1
    for dim in reversed(order):
        strides[dim] = 0 if broadcast[dim] else running
        if not broadcast[dim]:
            running = running * shape[dim]
    return strides


def _exprs(num_symbols: int, *, min_constant: int) -> st.SearchStrategy[Expr]:
    symbolic = st.builds(
        Expr,
        scale=st.integers(1, 3),
        symbol=st.integers(0, num_symbols - 1),
        constant=st.integers(0, 2),
    )
    constant = st.builds(Expr, scale=st.just(0), symbol=st.none(), constant=st.integers(1, 5))
    if min_constant == 0:
        constant = st.builds(Expr, scale=st.just(0), symbol=st.none(), constant=st.integers(0, 7))
    return st.one_of(symbolic, constant)


@st.composite
def tensor_recipes(draw: st.DrawFn, num_symbols: int) -> TensorRecipe:
    ndim = draw(st.integers(0, 4))
    dims = tuple(draw(_exprs(num_symbols, min_constant=1)) for _ in range(ndim))
    order = tuple(draw(st.permutations(list(range(ndim)))))
    broadcast = tuple(draw(st.booleans()) and d.symbol is None for d in dims)
    offset = draw(st.one_of(st.none(), _exprs(num_symbols, min_constant=0)))
    dtype = draw(st.sampled_from(DTYPES))
    requires_grad = dtype.is_floating_point and dtype.itemsize > 1 and draw(st.booleans())
    return TensorRecipe(dims, order, broadcast, offset, dtype, requires_grad)


@dataclass(frozen=True)
class Symbols:
    count: int  # symbol 0 is the batch size
    equal_to_batch: frozenset[int]  # proven equal to symbol 0
    batch_index: int  # where the batch-size SymInt sits among the placeholders

    def hint(self, i: int) -> int:
        return 7 if i == 0 or i in self.equal_to_batch else 7 + 3 * i

    def values(self, size: int) -> list[int]:
        """What each symbol must be evaluated as, for the compile size ``size``."""
        return [
            size if i == 0 or i in self.equal_to_batch else self.hint(i) for i in range(self.count)
        ]


@st.composite
def placeholders(draw: st.DrawFn) -> tuple[Symbols, list[object]]:
    num_symbols = draw(st.integers(1, 3))
    equal = frozenset(i for i in range(1, num_symbols) if draw(st.booleans()))
    items = draw(
        st.lists(
            st.one_of(
                tensor_recipes(num_symbols),
                _exprs(num_symbols, min_constant=0),  # a SymInt (or int) placeholder
                st.none(),
            ),
            min_size=0,
            max_size=5,
        )
    )
    # the piece's batch-size input, somewhere among the placeholders
    batch_index = draw(st.integers(0, len(items)))
    items.insert(batch_index, Expr(1, 0, 0))
    return Symbols(num_symbols, equal, batch_index), items


def _symbolic_placeholders(
    symbol_spec: Symbols, recipes: list[object]
) -> tuple[FakeTensorMode, list[object]]:
    """The placeholders as Dynamo would leave them: fakes of one mode with a real ShapeEnv."""
    shape_env = ShapeEnv(duck_shape=False)
    mode = FakeTensorMode(shape_env=shape_env)
    symbols = []
    for i in range(symbol_spec.count):
        source = ConstantSource(f"s_{i}")
        hint = symbol_spec.hint(i)
        sym = shape_env.create_symbol(hint, source, dynamic_dim=DimDynamic.DYNAMIC)
        symbols.append(shape_env.create_symintnode(sym, hint=hint, source=source))
    for i in symbol_spec.equal_to_batch:
        # a guard, as when Dynamo adds two inputs of the same length: s_i is replaced by s_0
        assert bool(symbols[i] == symbols[0])
    values: list[object] = []
    with mode:
        for recipe in recipes:
            if isinstance(recipe, TensorRecipe):
                shape = [d.build(symbols) for d in recipe.dims]
                stride = _strides(shape, recipe.order, recipe.broadcast)
                if recipe.offset is None:
                    t = torch.empty_strided(shape, stride, dtype=recipe.dtype)
                else:
                    offset = recipe.offset.build(symbols)
                    extent = 1 + sum((s - 1) * st_ for s, st_ in zip(shape, stride, strict=True))
                    t = torch.empty(offset + extent, dtype=recipe.dtype).as_strided(
                        shape, stride, offset
                    )
                values.append(t.requires_grad_(recipe.requires_grad))
            elif isinstance(recipe, Expr):
                values.append(recipe.build(symbols))
            else:
                values.append(recipe)
    return mode, values


def _check(size: int, symbol_spec: Symbols, recipes: list[object]) -> None:
    mode, values = _symbolic_placeholders(symbol_spec, recipes)
    concrete = create_concrete_args(values, size, symbol_spec.batch_index)
    at = symbol_spec.values(size)
    assert len(concrete) == len(values)
    modes = set()
    for recipe, value, result in zip(recipes, values, concrete, strict=True):
        if isinstance(recipe, TensorRecipe):
            assert isinstance(result, FakeTensor), "a real tensor was allocated"
            shape = [d.at(at) for d in recipe.dims]
            stride = _strides(shape, recipe.order, recipe.broadcast)
            offset = recipe.offset.at(at) if recipe.offset is not None else 0
            assert all(type(d) is int for d in result.shape), "still symbolic"
            assert list(result.shape) == shape
            assert list(result.stride()) == stride
            assert result.storage_offset() == offset
            assert result.dtype == recipe.dtype
            assert result.device == value.device
            assert result.layout == value.layout
            assert result.requires_grad == recipe.requires_grad
            assert result.fake_mode is not mode
            modes.add(id(result.fake_mode))
        elif isinstance(recipe, Expr):
            assert type(result) is int and result == recipe.at(at)
        else:  # None, a plain int: passed through
            assert result is recipe
    assert len(modes) <= 1, "all tensors of one compile size share one fresh fake mode"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(size=st.integers(1, 4096), drawn=placeholders())
def test_batch_symbols_take_the_size_others_their_hint(
    size: int, drawn: tuple[Symbols, list[object]]
) -> None:
    _check(size, *drawn)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(size=st.integers(2**24, 2**34), drawn=placeholders())
def test_huge_sizes_allocate_nothing(size: int, drawn: tuple[Symbols, list[object]]) -> None:
    """Sizes whose real tensors would need terabytes: the results are fakes all the same."""
    at = drawn[0].values(size)
    for recipe in drawn[1]:  # beyond int64 element counts nothing can describe the tensor
        if isinstance(recipe, TensorRecipe):
            numel = 1
            for dim in recipe.dims:
                numel *= dim.at(at)
            assume(numel + (recipe.offset.at(at) if recipe.offset else 0) < 2**60)
    _check(size, *drawn)


def test_several_equal_symbols_and_a_weight() -> None:
    """The common graph: x[s0, 4096], positions[s1] (proven s1 == s0), a static weight."""
    x = TensorRecipe((Expr(1, 0, 0), Expr(0, None, 4096)), (0, 1), (False, False), None,
                     torch.bfloat16, False)  # fmt: skip
    positions = TensorRecipe((Expr(1, 1, 0),), (0,), (False,), None, torch.int64, False)
    weight = TensorRecipe((Expr(0, None, 4096), Expr(0, None, 4096)), (1, 0), (False, False),
                          None, torch.float32, True)  # fmt: skip
    symbols = Symbols(2, frozenset({1}), batch_index=3)
    _check(8192, symbols, [x, positions, weight, Expr(1, 0, 0), Expr(1, 1, 0), 5])


def test_mrope_positions_keep_their_buffer_stride() -> None:
    """positions = buf[:, :n] of a (3, S) buffer: the stride S is no batch size (#50046).

    Substituting the size for S too gave Inductor a stride of 16 to assert where the real
    buffer has S ("expected size 3==3, stride 65==16"); rows 1 and 2 start at offset S.
    """
    shape_env = ShapeEnv(duck_shape=False)
    mode = FakeTensorMode(shape_env=shape_env)

    def symbol(name: str, hint: int) -> torch.SymInt:
        source = ConstantSource(name)
        sym = shape_env.create_symbol(hint, source, dynamic_dim=DimDynamic.DYNAMIC)
        return shape_env.create_symintnode(sym, hint=hint, source=source)

    n, buffer_len = symbol("n", 7), symbol("S", 65)
    with mode:
        buffer = torch.empty(3, buffer_len, dtype=torch.int64)
        positions, rows_1_2 = buffer[:, :n], buffer[1:, :n]
    concrete = create_concrete_args([positions, rows_1_2, n], 16, 2)
    assert list(concrete[0].shape) == [3, 16] and list(concrete[0].stride()) == [65, 1]
    assert list(concrete[1].shape) == [2, 16] and concrete[1].storage_offset() == 65
    assert concrete[2] == 16
