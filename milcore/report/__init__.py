"""Human-readable reports: one :class:`Report` rendered as self-contained HTML and as Markdown."""

from milcore.report.document import Report, fmt, fmt_ci, plural

__all__ = ["Report", "fmt", "fmt_ci", "plural"]
