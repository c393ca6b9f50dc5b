-- Richer case files: the patient's gender and admission date, the typing difficulty, and
-- who wrote the story for which theme. Rows written before this migration keep NULL or ''
-- here and still read back: their difficulty is computed from their text when read.
ALTER TABLE story.stories
    ADD COLUMN patient_gender    text CHECK (patient_gender IN ('female', 'male', 'other')),
    ADD COLUMN admission_date    date,
    ADD COLUMN typing_difficulty smallint CHECK (typing_difficulty BETWEEN 0 AND 100),
    ADD COLUMN theme             text NOT NULL DEFAULT '',
    ADD COLUMN writer            text NOT NULL DEFAULT '',
    ADD COLUMN writer_model      text NOT NULL DEFAULT '';
