"""Test support shared by several test files: fakes (a Pinecone data-plane server), restatements of released
code (the CVNet networks, AMES's shortlist loader), launchers, browser helpers, a toy regression set for the
training-loop tests and a small class folder written by hand. No tests live here."""
