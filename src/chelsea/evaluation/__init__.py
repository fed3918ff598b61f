"""Measuring the methods: generated long-context tasks (:mod:`.tasks`), the resumable accuracy grid
(:mod:`.evaluate`), its tables and plots (:mod:`.report`), speed and memory (:mod:`.bench`) and
the key-similarity study (:mod:`.analyze`). The core never imports from here."""
