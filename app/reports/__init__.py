"""Reading a job's report: the headline figures, the guard's verdict, Pareto fronts and objective scores
(measures.py), comparisons across jobs (comparison.py) and their plots (plots.py). The worker imports
`headline`, `check_guard` and `guard_message` from here."""

from app.reports.measures import check_guard, guard_message, headline, objective_score, pareto_front, speed_point

__all__ = ["check_guard", "guard_message", "headline", "objective_score", "pareto_front", "speed_point"]
