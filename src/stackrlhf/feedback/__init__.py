"""Human feedback: the annotation web app, the store, export and agreement."""

DEFAULT_DB = "sqlite:///feedback.db"  # the feedback store when none is named: a SQLite file in the working folder
