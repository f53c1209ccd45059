"""Human feedback: the annotation web app, the store, export and agreement."""
