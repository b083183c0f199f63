"""Test support shared by several test files: fakes (a Pinecone data-plane server), restatements of released
code (the CVNet networks, AMES's shortlist loader), launchers and browser helpers. No tests live here."""
