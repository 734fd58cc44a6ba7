from reconciliation_pipeline_tests.builders import add_client, add_email, creditor, findings, reply, reports


def test_mismatch_is_repaired_and_reported(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor("forderungen@sparkasse-bochum.de", 999.99)])
    add_email(pg, from_email="forderungen@sparkasse-bochum.de", extracted=reply(amount="1.234,56"))
    result = reconcile()
    assert result.success
    doc = mongo_db.clients.find_one({"aktenzeichen": "542900"})
    assert doc["final_creditor_list"][0]["creditor_response_amount"] == 1234.56
    assert doc["final_creditor_list"][0]["claim_amount"] == 1500.0
    [report] = reports(pg)
    assert report["status"] == "completed" and report["auto_repaired"] == 1
    assert [(f["kind"], f["action"]) for f in findings(pg)] == [("data_mismatch", "repaired")]
