#pragma once
// EXPECT that a call throws c10::Error and that its message says what it should.
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <initializer_list>
#include <iostream>
#include <string>

namespace statemamba::test {

// Expects f() to throw a c10::Error whose message contains every one of `parts`. With
// STATEMAMBA_SHOW_ERRORS set, prints each message, for reading them all at once.
template <typename F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected a c10::Error mentioning '" << *parts.begin() << "', but nothing was thrown";
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    if (std::getenv("STATEMAMBA_SHOW_ERRORS")) std::cout << "  error: " << message << "\n";
    for (const auto& part : parts)
      EXPECT_NE(message.find(part), std::string::npos) << "the message lacks '" << part << "':\n" << message;
  }
}

}  // namespace statemamba::test
