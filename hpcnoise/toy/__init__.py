"""The 2-D convex quadratic toy of Section 3: full versus diagonal Fisher noise (Figs. 1-2, Theorem 3.1).

L(theta) = theta^T A theta / 2 and the noisy iteration theta <- theta - a_k A theta + a_k C xi, xi ~ N(0, I).
Fisher and Hessian coincide here (both are A), so "full Fisher" noise is C = sqrt(A) and "diagonal Fisher"
noise is C = sqrt(diag A). The paper gives no numbers for its toy; ours is ToyConfig (in model).

What is computed, each as data that tests check:
- Tr(C^T A C), the term Theorem 3.1 says separates the two choices, against its closed forms.
- Trajectories at a constant learning rate (Fig. 2) and one-step noise clouds (Fig. 1).
- E[L(theta_k)] under the theorem's schedule a_k = 2 / ((k + gamma) lambda_min), three ways: Monte-Carlo over
  independent chains (vectorised over chains), the exact moment recursion, and the bound nu / (k + gamma).
- The constant-learning-rate stationary loss, by Monte-Carlo with paired noise and in closed form.

Modules: model (the quadratic, noise matrices, Theorem 3.1's constants, exact closed forms), simulate (the
random experiments), figures (the PNGs), summary (toy.json and its readable account), runner (``run``).
The command line is ``hpcnoise.cli.toy``.
"""

from hpcnoise.toy import figures, model, runner, simulate, summary
from hpcnoise.toy.figures import *  # noqa: F403
from hpcnoise.toy.model import *  # noqa: F403
from hpcnoise.toy.runner import *  # noqa: F403
from hpcnoise.toy.simulate import *  # noqa: F403
from hpcnoise.toy.summary import *  # noqa: F403

# Each module's public names, re-exported: `from hpcnoise import toy` then toy.run, toy.Noise, ...
__all__: list[str] = []
__all__ += model.__all__
__all__ += simulate.__all__
__all__ += figures.__all__
__all__ += summary.__all__
__all__ += runner.__all__
