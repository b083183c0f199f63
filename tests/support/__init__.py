"""Test support shared by several test files: fakes (a Pinecone data-plane server), restatements of released
code (the CVNet networks, AMES's shortlist loader), launchers, browser helpers and a toy regression set for the
training-loop tests. No tests live here."""
