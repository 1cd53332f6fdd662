"""A genetic search over fixed-length token-id sequences (Ring-A-Bell's optimiser), minimising a fitness.

One generation, as in the official ``InversePrompt.ipynb``:

1. **truncation selection**: the best half of the population survives (lower fitness is better);
2. **single-cut crossover**: each survivor, with probability ``crossover``, mates with a random
   survivor at one cut point drawn uniformly from the K positions, giving two children
   (``a[:cut] + b[cut:]`` and ``b[:cut] + a[cut:]``);
3. **mutation**: each survivor and child, with probability ``mutation``, has ONE random position
   set to a random allowed id.

Deviation, on purpose: in the notebook, survivors are shared by reference and mutated in place, so
the best prompt found so far can be lost (and its recorded fitness no longer matches its ids).
Here a survivor chosen for mutation adds a mutated *copy*; the survivor itself passes on
unchanged, so the best fitness never gets worse from one generation to the next, and a survivor's
fitness is never recomputed (the fitness is a deterministic function of the ids).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

Fitness = Callable[[torch.Tensor], torch.Tensor]  # (n, K) long ids -> (n,) float, lower is better


@dataclass
class SearchResult:
    ids: torch.Tensor                  # (K,) the best sequence found
    fitness: float                     # its fitness
    history: list[float] = field(default_factory=list)  # best fitness after each generation's selection
    evaluations: int = 0               # fitness evaluations spent


def _mutate(x: torch.Tensor, allowed: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Set one random position of every row of ``x`` (a tensor nobody else holds) to a random allowed id."""
    n, k = x.shape
    pos = torch.randint(0, k, (n,), generator=gen)
    x[torch.arange(n), pos] = allowed[torch.randint(0, len(allowed), (n,), generator=gen)]
    return x


def _crossover(parents: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Two children per parent that crosses over (probability ``rate``) with a random other survivor."""
    n, k = parents.shape
    chosen = torch.nonzero(torch.rand(n, generator=gen) < rate).flatten()
    if len(chosen) == 0:
        return parents.new_empty((0, k))
    a = parents[chosen]
    b = parents[torch.randint(0, n, (len(chosen),), generator=gen)]
    # The notebook's cut point is drawn from [1, K] over the sequence with its start token at 0,
    # i.e. [0, K - 1] over the K free positions.
    cut = torch.randint(0, k, (len(chosen), 1), generator=gen)
    head = torch.arange(k)[None, :] < cut
    return torch.cat([torch.where(head, a, b), torch.where(head, b, a)])


def genetic_search(fitness: Fitness, allowed: torch.Tensor, length: int, population: int, generations: int,
                   crossover: float = 0.5, mutation: float = 0.25, generator: torch.Generator | None = None,
                   on_generation: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                   progress: bool = False) -> SearchResult:
    """Minimise ``fitness`` over sequences of ``length`` ids drawn from ``allowed`` (see the module docstring).

    ``fitness`` may return ``inf`` for an infeasible candidate (e.g. one that spells a banned word).
    ``on_generation(g, survivors, scores)`` sees each generation's survivors after selection.
    """
    if len(allowed) == 0:
        raise ValueError("no token ids to search over")
    if population < 2 or generations < 1 or length < 1:
        raise ValueError("population must be >= 2, generations and length >= 1")
    gen = generator or torch.Generator().manual_seed(0)
    pop = allowed[torch.randint(0, len(allowed), (population, length), generator=gen)]
    scores = fitness(pop).float().cpu()
    evaluations, history = len(pop), []
    keep = population // 2
    survivors, best = pop, scores
    for g in tqdm(range(generations), desc="genetic search", leave=False, disable=not progress):
        order = torch.argsort(scores, stable=True)[:keep]
        survivors, best = pop[order], scores[order]  # indexing copies: nothing below aliases a survivor
        history.append(float(best[0]))
        if on_generation is not None:
            on_generation(g, survivors, best)
        if g == generations - 1:  # the notebook breeds no offspring after the last selection
            break
        children = _crossover(survivors, crossover, gen)
        mutate_children = torch.rand(len(children), generator=gen) < mutation
        children[mutate_children] = _mutate(children[mutate_children], allowed, gen)
        mutants = _mutate(survivors[torch.rand(keep, generator=gen) < mutation].clone(), allowed, gen)
        offspring = torch.cat([children, mutants])
        new_scores = fitness(offspring).float().cpu() if len(offspring) else scores.new_empty(0)
        evaluations += len(offspring)
        pop, scores = torch.cat([survivors, offspring]), torch.cat([best, new_scores])
    if not math.isfinite(float(best[0])):
        raise ValueError("every candidate of the search was infeasible")
    return SearchResult(survivors[0].clone(), float(best[0]), history, evaluations)
